"""Planning a training run: from what the user asked for to exactly what the trainer will do.

One resolution serves a fresh run, a fine-tune and a resume: the options are checked, a registry
corpus name becomes its files, the corpus is tokenized (through the token store), and every
setting of the run's two configs is the user's value where given and otherwise the starting
point's fallback: the sizing of this machine and corpus (``_Fresh``), the model started from
(``_FineTune``), or the run itself (``_Resume``). Each starting point also says which given
options it refuses and where the run is written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from charlm.config import ModelConfig, TrainConfig
from charlm.data import corpora
from charlm.data.tokenizer import extend_tokenizer
from charlm.data.tokenstore import prepare_corpus, spooled
from charlm.errors import ConfigError
from charlm.model.checkpoint import load_checkpoint, resolve_checkpoint
from charlm.model.lm import resolve_device
from charlm.model.precision import resolve_precision
from charlm.training import speed
from charlm.training.autosize import AutoSize, auto_size, char_input_dropout
from charlm.training.distributed import Dist
from charlm.training.memory import device_memory_bytes, training_memory_bytes
from charlm.training.options import BY_NAME, DEFAULT_LOG_EVERY, DEFAULT_MINUTES, RESUME_KEYS, TrainOptions
from charlm.training.resume import resume_configs
from charlm.training.resume_state import load_resume
from charlm.training.rundir import new_run_dir
from charlm.training.sizing import Shape, Sized, size_by_speed
from charlm.training.sizing import embed_size as sizing_embed

_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size")
_TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# The peak rate of an optimizer other than AdamW, by tokenizer, when --lr is not given.
OPTIMIZER_LR = {"sgd": {"word": 20.0, "char": 1.0, "byte": 1.0}, "adagrad": {"word": 0.1, "char": 0.1, "byte": 0.1},
                "rmsprop": {"word": 2e-3, "char": 2e-3, "byte": 2e-3}}


@dataclass
class RunPlan:
    """What the trainer is handed: configs, data, where to write, and what to resume."""

    model_config: ModelConfig
    train_config: TrainConfig
    data: Any  # data.text.PreparedData
    run_dir: Path
    source: str  # the corpus file (or the built-in's name), recorded in the checkpoint
    val_source: str | None
    resume: Any = None  # resume_state.Resume
    notes: list[str] = field(default_factory=list)
    init_weights: Any = None  # fine-tuning: the starting model's tensors
    corpus_options: dict[str, Any] = field(default_factory=dict)  # how the corpus was read, kept for --resume
    precision_reason: str | None = None  # why the run's --precision (the start line says it)
    sizing: dict[str, Any] | None = None  # what was measured to size the model, and why (sizing.Sized)


@dataclass
class _Request:
    """The options after the first decisions: what was given, the corpus files, who prints notes."""

    options: TrainOptions
    given: frozenset[str]
    dist: Any
    note: Callable[[str], None] | None
    run_name: str | None = None  # a registry corpus's name, for the run folder

    def gave(self, name: str) -> bool:
        """Whether the user chose this option. One whose unset value is None ("the planner
        chooses") is chosen when it holds a value, so None given explicitly still means "choose";
        any other is chosen when named as given (even at its default)."""
        if BY_NAME[name].nullable:
            return getattr(self.options, name) is not None
        return name in self.given


def plan_run(options: TrainOptions, *, given: Collection[str] = (), dist: Any = None,
             on_note: Callable[[str], None] | None = None) -> RunPlan:
    """Decide everything about a run. ``given`` names the options the user gave explicitly (a
    resumed run honours or refuses each of them, even one equal to its default)."""
    options.check()
    if options.resume is None and options.init_from is None and options.precision != "auto":
        # Refused before any corpus is read: a format this device cannot run (bf16 on an AVX2-only CPU).
        resolve_precision(options.precision, resolve_device(options.device), cell=options.cell)
    if options.average_power is not None and options.average is None:  # --average-power asks for averaging
        options, given = dataclasses.replace(options, average=True), {*given, "average"}
    dist = dist or Dist()
    request = _registry_corpus(_Request(options, frozenset(given), dist, on_note if dist.is_main else None))
    start = (_Resume(request) if options.resume is not None else _FineTune(request) if options.init_from is not None
             else _Fresh(request))
    start.refuse()
    corpus_data, data = start.read_corpus()
    values = start.settings(data)
    values.update({name: getattr(start.options, name) for name in (*_MODEL_FIELDS, *_TRAIN_FIELDS)
                   if start.takes_given(name) and request.gave(name)})
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, **{k: values[k] for k in _MODEL_FIELDS})
    train_cfg = TrainConfig(**{k: values[k] for k in _TRAIN_FIELDS})
    options = start.options
    return RunPlan(model_cfg, train_cfg, data, start.run_dir(corpus_data), corpus_data.source, start.val_source,
                   resume=start.resume, notes=start.notes(corpus_data, data), init_weights=start.init_weights,
                   corpus_options={"include": list(options.include), "exclude": list(options.exclude),
                                   "encoding_errors": options.encoding_errors,
                                   "corpus_digest": (corpus_data.files or {}).get("digest")},
                   precision_reason=start.precision_reason, sizing=start.sizing)


def _registry_corpus(request: _Request) -> _Request:
    """A registry name reads that corpus's train.txt once 'charlm corpus get NAME' has fetched it
    (a file of the same name wins), its own validation split, and the tokenizer its published
    results use unless one was asked for. The run folder keeps the corpus name, not "train"."""
    options = request.options
    if options.corpus is None or (registered := corpora.resolve_corpus_name(options.corpus)) is None:
        return request
    name = options.corpus
    options = dataclasses.replace(options, corpus=str(registered.train), val_file=options.val_file or (
        str(registered.valid) if registered.valid is not None else None))
    measured_with = corpora.get_spec(name).tokenizer
    if "tokenizer" not in request.given and options.resume is None and options.init_from is None \
            and options.tokenizer != measured_with:
        options = dataclasses.replace(options, tokenizer=measured_with)
        if request.note is not None:
            request.note(f"note: --tokenizer {measured_with}, the tokenizer {name}'s published results use "
                         f"(give --tokenizer to choose another)")
    return dataclasses.replace(request, options=options, run_name=name)


class _Start:
    """A starting point: what it refuses, how it reads the corpus, its fallback for every setting."""

    resume: Any = None
    init_weights: Any = None
    precision_reason: str | None = None
    sizing: dict[str, Any] | None = None

    def __init__(self, request: _Request) -> None:
        self.request = request
        self.options = request.options  # a resumed run reads its corpus as it did (_Resume replaces these)
        val_file = request.options.val_file
        self.val_source = ((val_file if Path(val_file).is_fifo() else str(Path(val_file).resolve()))  # a pipe as given
                           if val_file else None)

    def refuse(self) -> None:
        """Raise ``ConfigError`` for a given option this starting point cannot honour."""

    def read_corpus(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def settings(self, data: Any) -> dict[str, Any]:
        """Every config field's value where the user gave nothing."""
        raise NotImplementedError

    def takes_given(self, name: str) -> bool:
        """Whether a given value of option ``name`` replaces the fallback."""
        return True

    def notes(self, corpus_data: Any, data: Any) -> list[str]:
        return []

    def run_dir(self, corpus_data: Any) -> Path:
        """``--out`` (which must not hold a run already), or a fresh ``checkpoints/<name>[-N]``."""
        options, dist = self.options, self.request.dist
        if options.out is None:
            name = self.request.run_name or corpus_data.name
            return Path(dist.broadcast_object(str(new_run_dir("checkpoints", name))))
        run_dir = Path(options.out)
        if dist.is_main and run_dir.exists() and any(run_dir.glob("*.safetensors")):
            raise ConfigError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it "
                              f"or choose another --out")
        return run_dir

    def _read(self, corpus: str | None, val_source: str | None, **how: Any) -> tuple[Any, Any]:
        """The corpus through the token store: rank 0 tokenizes (and fills the store) first, the
        other ranks then read it."""
        options = self.options
        return self.request.dist.main_first(lambda: prepare_corpus(
            corpus, val_path=val_source, encoding_errors=options.encoding_errors, on_note=self.request.note,
            include=options.include, exclude=options.exclude, **how))

    def _declared(self) -> dict[str, Any]:
        """The declared values (the options as given or by default), the budget's when no stopping
        rule is given, and the log interval's."""
        options = self.options
        values = {name: getattr(options, name) for name in (*_MODEL_FIELDS, *_TRAIN_FIELDS)}
        if options.epochs is None and options.max_steps is None and options.max_minutes is None:
            values["max_minutes"] = DEFAULT_MINUTES
        values["log_every"] = DEFAULT_LOG_EVERY
        return values


class _Fresh(_Start):
    """A new run: the shape sized to this machine, the corpus and the budget."""

    def read_corpus(self) -> tuple[Any, Any]:
        options = self.options
        corpus_data, data = self._read(options.corpus, self.val_source, kind=options.tokenizer,
                                       val_fraction=options.val_fraction, min_count=_min_count(options),
                                       max_vocab=options.max_vocab)
        if self.request.dist.broadcast_object(data.tokenizer.to_dict()) != data.tokenizer.to_dict():
            raise ConfigError("the processes of the distributed run built different vocabularies")
        return corpus_data, data

    def settings(self, data: Any) -> dict[str, Any]:
        request, options = self.request, self.options
        values = self._declared()
        device = resolve_device(options.device)
        precision = resolve_precision(options.precision, device, cell=options.cell)
        self.precision_reason = precision.reason
        auto = self._sized(data, values["max_minutes"], device, precision)
        if options.residual and options.num_layers is None and auto.num_layers < 2:
            raise ConfigError(f"--residual connects stacked layers: give --num-layers (≥ 2); the default here is "
                              f"{auto.num_layers} (one wide layer learns fastest per CPU-second)")
        hidden = _chosen(request, "hidden_size", auto.hidden_size)
        tie = _chosen(request, "tie_weights", auto.tie_weights and options.embed_size in (None, hidden))
        dropout = _chosen(request, "dropout", auto.dropout)
        optimizer = _chosen(request, "optimizer", auto.optimizer)
        average = _chosen(request, "average", auto.average)
        values.update(
            hidden_size=hidden, num_layers=auto.num_layers, tie_weights=tie, dropout=dropout,
            embed_size=hidden if tie else min(hidden, auto.embed_size),
            # A char or byte model's input dropout follows its dropout, given or not; a word model's is its level's.
            input_dropout=auto.input_dropout if options.tokenizer == "word" else char_input_dropout(dropout),
            embed_dropout=auto.embed_dropout, weight_drop=auto.weight_drop, residual=False,
            seq_len=auto.seq_len, batch_size=auto.batch_size, optimizer=optimizer,
            min_lr_ratio=auto.min_lr_ratio if average else 0.0, activation_reg=auto.activation_reg,
            temporal_reg=auto.temporal_reg, precision=precision.name, average=auto.average,
            average_power=auto.average_power, shift_windows=auto.shift_windows,
            **_optimizer_defaults(request, optimizer, auto.lr))
        return values

    def takes_given(self, name: str) -> bool:
        return name != "precision"  # the option is resolved ("auto" → what this device runs)

    def _sized(self, data: Any, max_minutes: float | None, device: torch.device, precision: Any) -> AutoSize:
        """The tables' size, moved along sizing.py's ladder by this machine's measured speed in the
        run's own number format where the budget is in minutes and the shape left to charlm (word
        models keep the tables: autosize.py says why)."""
        options, dist = self.options, self.request.dist
        auto = auto_size(tokenizer=options.tokenizer, train_tokens=len(data.train_ids), max_minutes=max_minutes,
                         gpu=device.type == "cuda", bf16=precision.name == "bf16")
        shape_given = any(getattr(options, key) is not None for key in ("hidden_size", "num_layers", "embed_size",
                                                                         "batch_size", "seq_len", "tie_weights"))
        if max_minutes is None or device.type not in ("cpu", "cuda") or dist.enabled or shape_given \
                or options.tokenizer == "word":
            return auto
        sized = _measured_size(data, options.cell, max_minutes, device, precision, start=auto.hidden_size)
        self.sizing = sized.to_dict()
        shape = sized.shape
        return dataclasses.replace(auto, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                                   embed_size=sized.embed_size, dropout=sized.dropout, seq_len=shape.seq_len,
                                   batch_size=shape.batch_size, lr=shape.lr, reason=sized.reason,
                                   input_dropout=sized.input_dropout, shift_windows=sized.shift_windows)

    def notes(self, corpus_data: Any, data: Any) -> list[str]:
        notes = [f"sized for this machine: {self.sizing['reason']}"] if self.sizing else []
        if unknown := data.tokenizer.count_unknown(data.val_ids):
            notes.append(f"note: {unknown:,} validation tokens are not in the training vocabulary (scored as <UNK>)")
        return notes


def _measured_size(data: Any, cell: str, minutes: float, device: torch.device, precision: Any, *,
                   start: int) -> Sized:
    """sizing.size_by_speed with this run's candidates: each shape timed by the trainer's step, and
    only shapes that fit in half the device's memory."""
    gpu = device.type == "cuda"
    memory = device_memory_bytes(device)

    def candidate(shape: Shape) -> ModelConfig:
        return ModelConfig(vocab_size=data.tokenizer.vocab_size, cell=cell, hidden_size=shape.hidden_size,
                           num_layers=shape.num_layers, embed_size=sizing_embed(shape, gpu), dropout=0.2)

    def rate(shape: Shape) -> float:
        try:
            return speed.measure_train_rate(candidate(shape), batch_size=shape.batch_size, seq_len=shape.seq_len,
                                            precision=precision, device=device)
        except torch.OutOfMemoryError:  # too large for this device after all: not a candidate
            return 0.0

    def fits(shape: Shape) -> bool:  # at most half the device, leaving room for everything else
        need = training_memory_bytes(candidate(shape), shape.batch_size, shape.seq_len)
        return memory is None or 2 * need <= memory

    return size_by_speed(train_tokens=len(data.train_ids), minutes=minutes, cell=cell, gpu=gpu,
                         precision=precision.name, speed=rate, fits=fits, start=start)


# What a fine-tune takes from the model it starts from: the shape (and with it the tokenizer).
_MODEL_SHAPE = ("cell", "residual", "hidden_size", "num_layers", "embed_size", "tie_weights")
_SHAPE = (*_MODEL_SHAPE, "tokenizer")
# What it takes from the model where not given: its regularisation and the way it was trained.
_FROM_BASE = ("dropout", "input_dropout", "embed_dropout", "weight_drop", "seq_len", "batch_size", "weight_decay",
              "clip", "optimizer", "min_lr_ratio", "activation_reg", "temporal_reg", "average", "average_power",
              "shift_windows")


class _FineTune(_Start):
    """A new run that starts from a trained model: its shape and vocabulary (extended with the new
    text's symbols on ``--extend-vocab``), a fresh optimizer and schedule. Tokens the model never
    saw become ``<UNK>`` otherwise, and the plan's notes say how many."""

    def __init__(self, request: _Request) -> None:
        super().__init__(request)
        self.base = load_checkpoint(resolve_checkpoint(request.options.init_from))
        self.tokenizer = self.base.tokenizer
        # Refused before any corpus is read: a format or device this machine cannot run.
        self.precision = resolve_precision(request.options.precision, resolve_device(request.options.device),
                                           cell=self.base.model_config.cell)
        self.precision_reason = self.precision.reason

    def refuse(self) -> None:
        options = self.options
        shape = {**self.base.model_config.to_dict(), "tokenizer": self.base.tokenizer.kind}
        for key in _SHAPE:
            if self.request.gave(key) and getattr(options, key) != shape[key]:
                raise ConfigError(f"{BY_NAME[key].flag} {getattr(options, key)} conflicts with the model "
                                  f"given to --init-from, which has {shape[key]}; a fine-tune keeps the model's shape")
        for key in ("min_count", "max_vocab"):
            if self.request.gave(key) and not options.extend_vocab:
                raise ConfigError(f"{BY_NAME[key].flag} applies to the new symbols of --extend-vocab only; "
                                  f"without it the vocabulary is the model's")

    def read_corpus(self) -> tuple[Any, Any]:
        options, corpus, val_source = self.options, self.options.corpus, self.val_source
        # --extend-vocab reads the corpus twice (its new symbols, then the ids): a pipe is copied once first.
        with spooled([corpus, val_source] if options.extend_vocab else [None, None]) as (spooled_corpus, spooled_val):
            if options.extend_vocab:
                corpus, val_source = spooled_corpus, spooled_val
                kind = self.tokenizer.kind
                _, fitted = self._read(corpus, val_source, kind=kind, val_fraction=options.val_fraction,
                                       min_count=_min_count(dataclasses.replace(options, tokenizer=kind)),
                                       max_vocab=options.max_vocab)
                self.tokenizer = extend_tokenizer(self.tokenizer, fitted.tokenizer)
            return self._read(corpus, val_source, val_fraction=options.val_fraction, tokenizer=self.tokenizer)

    def settings(self, data: Any) -> dict[str, Any]:
        request, base, precision = self.request, self.base, self.precision
        before = {**(base.train_config or TrainConfig()).to_dict(), **base.model_config.to_dict()}
        values = {**self._declared(), **{key: before[key] for key in (*_MODEL_SHAPE, *_FROM_BASE)}}
        optimizer = _chosen(request, "optimizer", before["optimizer"])
        values.update(precision=precision.name, lr=before["lr"] if optimizer == before["optimizer"] else
                      OPTIMIZER_LR.get(optimizer, {}).get(base.tokenizer.kind, before["lr"]))
        self.init_weights = {name: tensor.detach().cpu() for name, tensor in base.model.state_dict().items()}
        return values

    def takes_given(self, name: str) -> bool:
        return name not in ("precision", *_SHAPE)

    def notes(self, corpus_data: Any, data: Any) -> list[str]:
        notes, old = [], self.base.tokenizer.vocab_size
        if added := self.tokenizer.vocab_size - old:
            notes.append(f"note: --extend-vocab added {added:,} token(s) the model had never seen; their embedding "
                         f"and output rows start fresh, the other {old:,} are the model's")
        if unknown := self.tokenizer.count_unknown(data.train_ids):
            notes.append(f"note: {unknown:,} training tokens are not in the vocabulary of the model given to "
                         f"--init-from and are read as <UNK> (--extend-vocab learns them instead)")
        return notes


class _Resume(_Start):
    """The run in ``--resume``'s folder, continued where it stopped: its settings, with each option
    given honoured or refused by its declared resume policy (resume.resume_configs), never ignored."""

    def __init__(self, request: _Request) -> None:
        super().__init__(request)
        options = request.options
        resume_dir = Path(options.resume)
        if options.out is not None and Path(options.out).resolve() != resume_dir.resolve():
            raise ConfigError(f"--out cannot be given with --resume: a resumed run continues in its own folder "
                              f"({resume_dir})")
        self.resume = load_resume(resume_dir)
        self.state = self.resume.checkpoint.train_state
        # The corpus is read as the run read it: its files, folder patterns and --encoding-errors, unless given.
        self.source = options.corpus or self.state.get("corpus") or None
        self.val_source = self.val_source or self.state.get("val_corpus")
        self.options = dataclasses.replace(
            options, include=options.include or tuple(self.state.get("include") or ()),
            exclude=options.exclude or tuple(self.state.get("exclude") or ()),
            encoding_errors=(options.encoding_errors if "encoding_errors" in request.given
                             else self.state.get("encoding_errors") or options.encoding_errors))
        self.precision_reason = None if "precision" in request.given else "the run's own"
        self.configs: tuple[ModelConfig, TrainConfig] | None = None

    def refuse(self) -> None:
        given = {key: getattr(self.options, key) for key in self.request.given if key in RESUME_KEYS}
        self.configs = resume_configs(self.resume, given)

    def read_corpus(self) -> tuple[Any, Any]:
        assert self.configs is not None  # refuse() ran first
        return self._read(self.source, self.val_source, val_fraction=self.configs[1].val_fraction,
                          tokenizer=self.resume.checkpoint.tokenizer)

    def settings(self, data: Any) -> dict[str, Any]:
        assert self.configs is not None
        return {**self.configs[0].to_dict(), **self.configs[1].to_dict()}

    def takes_given(self, name: str) -> bool:
        return False  # resume_configs has applied what was given, by each option's policy

    def run_dir(self, corpus_data: Any) -> Path:
        return self.resume.run_dir

    def notes(self, corpus_data: Any, data: Any) -> list[str]:
        notes = []
        # A vocabulary cut by --min-count leaves some <UNK> by design; most of the text is another corpus.
        if (unknown := data.tokenizer.count_unknown(data.train_ids)) > 0.25 * len(data.train_ids):
            notes.append(f"warning: {unknown:,} of the {len(data.train_ids):,} training tokens are not in the "
                         f"resumed model's vocabulary (read as <UNK>); is this the run's corpus?")
        digest = (corpus_data.files or {}).get("digest")
        if self.state.get("corpus_digest") and digest != self.state["corpus_digest"]:
            notes.append(f"warning: the files under {corpus_data.source} (or their sizes) changed since the run "
                         f"began, so its training and validation text differ from before; the best "
                         f"validation loss so far was measured on the old validation files")
        return notes


def _chosen(request: _Request, name: str, fallback: Any) -> Any:
    """The user's value of option ``name`` where given (0 included), else ``fallback``."""
    return getattr(request.options, name) if request.gave(name) else fallback


def _min_count(options: TrainOptions) -> int:
    """--min-count, else 2 for words (the words seen once become <UNK>, so <UNK> is trained and a
    held-out text's unseen words are predicted as it) and 1 for characters and bytes."""
    if options.min_count is not None:
        return options.min_count
    return 2 if options.tokenizer == "word" else 1


def _optimizer_defaults(request: _Request, optimizer: str, adamw_lr: float) -> dict[str, float]:
    """--lr, --weight-decay and --clip where not given: AdamW's auto-sized rate and the declared
    defaults; for the others a rate of their scale, no L2 decay, and SGD the word-LM example's clip
    of 0.25."""
    options = request.options
    if optimizer == "adamw":
        return {"lr": adamw_lr, "weight_decay": options.weight_decay, "clip": options.clip}
    return {"lr": OPTIMIZER_LR[optimizer][options.tokenizer], "weight_decay": 0.0,
            "clip": 0.25 if optimizer == "sgd" else options.clip}
