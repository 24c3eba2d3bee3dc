"""Planning a training run: from what the user asked for to exactly what the trainer will do.

``TrainOptions`` holds what a user can ask (``None``: "choose for me"); ``plan_run`` makes every
decision between that and the trainer, so ``charlm train`` and ``charlm.train()`` make the same
ones: a registry corpus name → its files, options checked before any work, the corpus tokenized
(through the token cache), the model and batch sized to the corpus and budget (``auto_size``), a
resumed run's options honoured or refused, a fine-tuned model's vocabulary carried over, and the
run folder chosen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from charlm.config import (OPTIMIZERS, TOKENIZERS, ModelConfig, TrainConfig, auto_size, char_input_dropout, check_decay,
                     check_option, check_precision)
from charlm.errors import ConfigError
from charlm.training.sizing import Shape, size_by_speed
from charlm.training.sizing import embed_size as sizing_embed

DEFAULT_MINUTES = 3.0  # the budget when no stopping rule is given
DEFAULT_LOG_EVERY = 10
_TRAIN = TrainConfig()


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``charlm train`` accepts, by the option's name. ``None`` means "not given"."""

    corpus: str | None = None  # a file, a folder of files, a registry name, or None for the built-in text
    include: tuple[str, ...] = ()  # a folder corpus: the file name patterns to read (all files if empty)
    exclude: tuple[str, ...] = ()  # a folder corpus: file or folder name patterns to leave out
    tokenizer: str = "char"
    cell: str = "lstm"
    optimizer: str | None = None  # None: SGD for word models, AdamW otherwise (config.auto_size)
    hidden_size: int | None = None
    num_layers: int | None = None
    embed_size: int | None = None
    dropout: float | None = None
    input_dropout: float | None = None
    embed_dropout: float | None = None
    weight_drop: float | None = None
    activation_reg: float | None = None
    temporal_reg: float | None = None
    tie_weights: bool | None = None
    residual: bool | None = None  # None: off
    seq_len: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = _TRAIN.weight_decay
    clip: float = _TRAIN.clip
    warmup_steps: int = _TRAIN.warmup_steps
    min_lr_ratio: float | None = None  # None: 0 (cosine to zero), or as auto-sized for averaged word models
    average: bool | None = None  # None: as auto-sized (on for word models)
    average_power: float | None = None  # giving it turns --average on
    shift_windows: bool | None = None  # None: as auto-sized (on for word models of many epochs)
    cache: bool = True  # fit a cache pointer on the validation split when the run ends (pointer.py)
    epochs: int | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    val_fraction: float = _TRAIN.val_fraction
    val_file: str | None = None
    eval_every: int | None = None
    patience: int | None = None
    seed: int = _TRAIN.seed
    device: str = _TRAIN.device
    precision: str = "auto"
    tf32: bool = True  # on CUDA: TF32 tensor cores for float32 products (False: exact float32)
    out: str | None = None
    min_count: int | None = None  # None: 2 for word models (a trained <UNK>), 1 otherwise
    max_vocab: int | None = None
    resume: str | None = None
    init_from: str | None = None  # fine-tune: a checkpoint or run folder to start from
    extend_vocab: bool = False
    encoding_errors: str = "strict"
    max_bad_steps: int = _TRAIN.max_bad_steps
    log_every: int | None = None

    def check(self) -> None:
        """Every numeric option against its range (config.LIMITS), before any work is done."""
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"--tokenizer must be one of {', '.join(TOKENIZERS)} (got {self.tokenizer!r})")
        check_precision(self.precision)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        for name in NUMERIC_OPTIONS:
            check_option(name, getattr(self, name), optional=True)
        if self.lr is not None:
            check_decay(lr=self.lr, weight_decay=self.weight_decay)
        from charlm.data.text import ENCODING_ERRORS

        if self.encoding_errors not in ENCODING_ERRORS:
            raise ConfigError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)} "
                              f"(got {self.encoding_errors!r})")
        if self.extend_vocab and self.init_from is None:
            raise ConfigError("--extend-vocab needs --init-from (it extends that model's vocabulary)")
        if self.init_from is not None and self.resume is not None:
            raise ConfigError("give --resume (continue a run) or --init-from (start a new run from a model), "
                              "not both")
        if self.average is False and self.average_power is not None:
            raise ConfigError("--average-power sets how --average weighs recent steps; it cannot be given with "
                              "--no-average")
        if self.tokenizer == "word" and self.max_vocab is not None and self.max_vocab < 3:
            raise ConfigError(f"--max-vocab must be ≥ 3 for a word model (it includes <UNK> and <EOS>; "
                              f"got {self.max_vocab})")


NUMERIC_OPTIONS = ("hidden_size", "num_layers", "embed_size", "dropout", "input_dropout", "embed_dropout",
                   "weight_drop", "activation_reg", "temporal_reg", "seq_len", "batch_size", "lr",
                   "weight_decay", "clip", "warmup_steps", "min_lr_ratio", "epochs", "max_steps", "max_minutes",
                   "val_fraction", "eval_every", "patience", "seed", "min_count", "max_vocab", "max_bad_steps",
                   "log_every", "average_power")
# The options a resumed run hands to trainer.resume_configs, which honours or refuses each.
_RESUME_KEYS = ("tokenizer", "cell", "residual", "hidden_size", "num_layers", "embed_size", "dropout", "input_dropout",
                "embed_dropout", "weight_drop", "activation_reg", "temporal_reg", "optimizer", "tie_weights", "seq_len",
                "batch_size", "lr", "weight_decay", "clip", "warmup_steps", "min_lr_ratio", "epochs", "max_steps",
                "max_minutes", "val_fraction", "eval_every", "patience", "seed", "device", "min_count", "max_vocab",
                "max_bad_steps", "log_every", "precision", "average", "average_power",
                "shift_windows", "cache", "tf32")


@dataclass
class RunPlan:
    """What the trainer is handed: configs, data, where to write, and what to resume."""

    model_config: ModelConfig
    train_config: TrainConfig
    data: Any  # data.PreparedData
    run_dir: Path
    source: str  # the corpus file (or the built-in's name), recorded in the checkpoint
    val_source: str | None
    resume: Any = None  # trainer.Resume
    notes: list[str] = field(default_factory=list)
    init_weights: Any = None  # fine-tuning: the starting model's tensors
    corpus_options: dict[str, Any] = field(default_factory=dict)  # how the corpus was read, kept for --resume
    precision_reason: str | None = None  # why the run's --precision (the start line says it)
    sizing: dict[str, Any] | None = None  # what was measured to size the model, and why (sizing.Sized)


def _corpus_options(options: "TrainOptions", corpus: Any) -> dict[str, Any]:
    """What a resumed run must read the corpus with again (cache.Corpus ``corpus``)."""
    return {"include": list(options.include), "exclude": list(options.exclude),
            "encoding_errors": options.encoding_errors, "corpus_digest": (corpus.files or {}).get("digest")}


def _given_or(value: Any, automatic: Any) -> Any:
    """The user's value when given (0 included: it is a value, and the configs check it)."""
    return automatic if value is None else value


def plan_run(options: TrainOptions, *, given: Collection[str] = (), dist: Any = None,
             on_note: Callable[[str], None] | None = None) -> RunPlan:
    """Decide everything about a run. ``given`` names the options the user gave explicitly (a
    resumed run honours or refuses each of them, even one equal to its default)."""
    import torch

    from charlm.data.tokenstore import prepare_corpus
    from charlm.data.corpora import get_spec, resolve_corpus_name
    from charlm.training.distributed import Dist
    from charlm.model.lm import resolve_device
    from charlm.model.precision import resolve_precision
    from charlm.training.memory import device_memory_bytes, training_memory_bytes
    from charlm.training.resume import resume_configs
    from charlm.training.resume_state import load_resume
    from charlm.training.speed import measure_train_rate

    options.check()
    if options.resume is None and options.init_from is None and options.precision != "auto":
        # Refused before any corpus is read: a format this device cannot run (bf16 on an AVX2-only CPU).
        resolve_precision(options.precision, resolve_device(options.device), cell=options.cell)
    if options.average_power is not None and options.average is None:  # --average-power asks for averaging
        options, given = dataclasses.replace(options, average=True), {*given, "average"}
    dist = dist or Dist()
    note = on_note if dist.is_main else None
    corpus, val_file, run_name = options.corpus, options.val_file, None
    # A registry name reads that corpus's train.txt once 'charlm corpus get NAME' has fetched it;
    # a file of the same name wins. The run folder keeps the corpus name, not "train".
    if corpus is not None and (registered := resolve_corpus_name(corpus)) is not None:
        run_name, corpus = corpus, str(registered.train)
        if val_file is None and registered.valid is not None:
            val_file = str(registered.valid)  # the corpus's own validation split, not a slice of train
        # The tokenizer its published results use (enwik8: bytes), unless one was asked for.
        measured_with = get_spec(run_name).tokenizer
        if "tokenizer" not in given and options.resume is None and options.init_from is None \
                and options.tokenizer != measured_with:
            options = dataclasses.replace(options, tokenizer=measured_with)
            if note is not None:
                note(f"note: --tokenizer {measured_with}, the tokenizer {run_name}'s published results use "
                     f"(give --tokenizer to choose another)")
    val_source = ((val_file if Path(val_file).is_fifo() else str(Path(val_file).resolve()))  # a pipe as given
                  if val_file else None)

    if options.resume is not None:
        resume_dir = Path(options.resume)
        if options.out is not None and Path(options.out).resolve() != resume_dir.resolve():
            raise ConfigError(f"--out cannot be given with --resume: a resumed run continues in its own folder "
                              f"({resume_dir})")
        res = load_resume(resume_dir)
        model_cfg, train_cfg = resume_configs(res, {k: getattr(options, k) for k in given if k in _RESUME_KEYS})
        source = corpus or res.checkpoint.train_state.get("corpus") or None
        val_source = val_source or res.checkpoint.train_state.get("val_corpus")
        # The corpus is read as the run read it: its folder patterns and --encoding-errors, unless given.
        state = res.checkpoint.train_state
        options = dataclasses.replace(
            options, include=options.include or tuple(state.get("include") or ()),
            exclude=options.exclude or tuple(state.get("exclude") or ()),
            encoding_errors=(options.encoding_errors if "encoding_errors" in given
                             else state.get("encoding_errors") or options.encoding_errors))
        # Rank 0 tokenizes (and fills the token cache) first; the others then read the cache.
        corpus_data, data = dist.main_first(lambda: prepare_corpus(
            source, val_fraction=train_cfg.val_fraction, tokenizer=res.checkpoint.tokenizer, val_path=val_source,
            encoding_errors=options.encoding_errors, on_note=note, include=options.include,
            exclude=options.exclude))
        notes = []
        # A vocabulary cut by --min-count leaves some <UNK> by design; most of the text is another corpus.
        if (unknown := data.tokenizer.count_unknown(data.train_ids)) > 0.25 * len(data.train_ids):
            notes.append(f"warning: {unknown:,} of the {len(data.train_ids):,} training tokens are not in the "
                         f"resumed model's vocabulary (read as <UNK>); is this the run's corpus?")
        digest = (corpus_data.files or {}).get("digest")
        if state.get("corpus_digest") and digest != state["corpus_digest"]:
            notes.append(f"warning: the files under {corpus_data.source} (or their sizes) changed since the run "
                         f"began, so its training and validation text differ from before; the best "
                         f"validation loss so far was measured on the old validation files")
        return RunPlan(model_cfg, train_cfg, data, res.run_dir, corpus_data.source, val_source, resume=res,
                       notes=notes, corpus_options=_corpus_options(options, corpus_data),
                       precision_reason=None if "precision" in given else "the run's own")

    max_minutes = options.max_minutes
    if options.epochs is None and options.max_steps is None and max_minutes is None:
        max_minutes = DEFAULT_MINUTES
    if options.init_from is not None:
        return _plan_fine_tune(options, given, dist, note, corpus, val_source, run_name, max_minutes)
    corpus_data, data = dist.main_first(lambda: prepare_corpus(
        corpus, kind=options.tokenizer, val_fraction=options.val_fraction, min_count=_min_count(options),
        max_vocab=options.max_vocab, val_path=val_source, encoding_errors=options.encoding_errors, on_note=note,
        include=options.include, exclude=options.exclude))
    if dist.broadcast_object(data.tokenizer.to_dict()) != data.tokenizer.to_dict():
        raise ConfigError("the processes of the distributed run built different vocabularies")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device, cell=options.cell)
    auto = auto_size(tokenizer=options.tokenizer, train_tokens=len(data.train_ids), max_minutes=max_minutes,
                     gpu=device.type == "cuda", bf16=precision.name == "bf16")
    shape_given = any(getattr(options, key) is not None for key in ("hidden_size", "num_layers", "embed_size",
                                                                     "batch_size", "seq_len", "tie_weights"))
    sized = sizing = None
    if max_minutes is not None and device.type in ("cpu", "cuda") and not dist.enabled and not shape_given \
            and options.tokenizer != "word":
        # How large a model the budget trains well, from this machine's measured speed in the run's
        # own number format (sizing.py); word models keep the tables (config.auto_size says why).
        gpu = device.type == "cuda"

        def candidate(shape: Shape) -> ModelConfig:
            return ModelConfig(vocab_size=data.tokenizer.vocab_size, cell=options.cell, hidden_size=shape.hidden_size,
                               num_layers=shape.num_layers, embed_size=sizing_embed(shape, gpu), dropout=0.2)

        def speed(shape: Shape) -> float:
            try:
                return measure_train_rate(candidate(shape), batch_size=shape.batch_size, seq_len=shape.seq_len,
                                          precision=precision, device=device)
            except torch.OutOfMemoryError:  # too large for this device after all: not a candidate
                return 0.0

        memory = device_memory_bytes(device)

        def fits(shape: Shape) -> bool:  # at most half the device, leaving room for everything else
            need = training_memory_bytes(candidate(shape), shape.batch_size, shape.seq_len)
            return memory is None or 2 * need <= memory

        sizing = size_by_speed(train_tokens=len(data.train_ids), minutes=max_minutes, cell=options.cell, gpu=gpu,
                               precision=precision.name, speed=speed, fits=fits, start=auto.hidden_size)
        shape = sizing.shape
        auto = dataclasses.replace(auto, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                                   embed_size=sizing.embed_size, dropout=sizing.dropout, seq_len=shape.seq_len,
                                   batch_size=shape.batch_size, lr=shape.lr, reason=sizing.reason,
                                   input_dropout=sizing.input_dropout, shift_windows=sizing.shift_windows)
        sized = f"sized for this machine: {sizing.reason}"
    hidden = _given_or(options.hidden_size, auto.hidden_size)
    if options.residual and options.num_layers is None and auto.num_layers < 2:
        raise ConfigError(f"--residual connects stacked layers: give --num-layers (≥ 2); the default here is "
                          f"{auto.num_layers} (one wide layer learns fastest per CPU-second)")
    tie = (options.tie_weights if options.tie_weights is not None
           else auto.tie_weights and options.embed_size in (None, hidden))
    dropout = _given_or(options.dropout, auto.dropout)
    # A char or byte model's input dropout follows its dropout, given or not; a word model's is its level's.
    input_dropout = auto.input_dropout if options.tokenizer == "word" else char_input_dropout(dropout)
    model_cfg = ModelConfig(
        vocab_size=data.tokenizer.vocab_size, cell=options.cell, hidden_size=hidden,
        num_layers=_given_or(options.num_layers, auto.num_layers), dropout=dropout,
        embed_size=_given_or(options.embed_size, hidden if tie else min(hidden, auto.embed_size)), tie_weights=tie,
        input_dropout=_given_or(options.input_dropout, input_dropout),
        embed_dropout=_given_or(options.embed_dropout, auto.embed_dropout),
        weight_drop=_given_or(options.weight_drop, auto.weight_drop), residual=_given_or(options.residual, False))
    options = dataclasses.replace(options, optimizer=options.optimizer or auto.optimizer)
    lr, weight_decay, clip = _optimizer_defaults(options, given, auto.lr)
    average = _given_or(options.average, auto.average)
    train_cfg = TrainConfig(
        tf32=options.tf32,
        seq_len=_given_or(options.seq_len, auto.seq_len), batch_size=_given_or(options.batch_size, auto.batch_size),
        lr=lr, weight_decay=weight_decay, clip=clip, optimizer=options.optimizer, warmup_steps=options.warmup_steps,
        min_lr_ratio=_given_or(options.min_lr_ratio, auto.min_lr_ratio if average else 0.0), epochs=options.epochs,
        max_steps=options.max_steps, max_minutes=max_minutes, val_fraction=options.val_fraction,
        eval_every=options.eval_every, patience=options.patience, seed=options.seed, device=options.device,
        max_bad_steps=options.max_bad_steps, log_every=_given_or(options.log_every, DEFAULT_LOG_EVERY),
        activation_reg=_given_or(options.activation_reg, auto.activation_reg),
        temporal_reg=_given_or(options.temporal_reg, auto.temporal_reg), precision=precision.name,
        average=average, average_power=_given_or(options.average_power, auto.average_power),
        shift_windows=_given_or(options.shift_windows, auto.shift_windows), cache=options.cache)
    run_dir = _new_run_dir(options, dist, run_name or corpus_data.name)
    notes = [sized] if sized else []
    if unknown := data.tokenizer.count_unknown(data.val_ids):
        notes.append(f"note: {unknown:,} validation tokens are not in the training vocabulary (scored as <UNK>)")
    return RunPlan(model_cfg, train_cfg, data, run_dir, corpus_data.source, val_source, notes=notes,
                   corpus_options=_corpus_options(options, corpus_data), precision_reason=precision.reason,
                   sizing=sizing.to_dict() if sizing else None)


# The peak rate of an optimizer other than AdamW, by tokenizer, when --lr is not given.
OPTIMIZER_LR = {"sgd": {"word": 20.0, "char": 1.0, "byte": 1.0}, "adagrad": {"word": 0.1, "char": 0.1, "byte": 0.1},
                "rmsprop": {"word": 2e-3, "char": 2e-3, "byte": 2e-3}}


def _min_count(options: TrainOptions) -> int:
    """--min-count, else 2 for words (the words seen once become <UNK>, so <UNK> is trained and
    a held-out text's unseen words are predicted as it: worth ~0.2 nats/word on Grimm) and 1 for
    characters and bytes (every symbol kept)."""
    if options.min_count is not None:
        return options.min_count
    return 2 if options.tokenizer == "word" else 1


def _optimizer_defaults(options: TrainOptions, given: Collection[str], adamw_lr: float) -> tuple[float, float, float]:
    """--lr, --weight-decay and --clip: the user's, else the optimizer's own defaults (AdamW's
    auto-sized rate; for the others a rate of their scale, no L2 decay, and SGD the word-LM
    example's clip of 0.25)."""
    if options.optimizer == "adamw":
        return _given_or(options.lr, adamw_lr), options.weight_decay, options.clip
    lr = _given_or(options.lr, OPTIMIZER_LR[options.optimizer][options.tokenizer])
    weight_decay = options.weight_decay if "weight_decay" in given else 0.0
    clip = options.clip if "clip" in given else 0.25 if options.optimizer == "sgd" else options.clip
    return lr, weight_decay, clip


def _new_run_dir(options: TrainOptions, dist: Any, name: str) -> Path:
    """``--out`` (which must not hold a run already), or a fresh ``checkpoints/<name>[-N]``."""
    from charlm.training.rundir import new_run_dir

    if options.out is None:
        return Path(dist.broadcast_object(str(new_run_dir("checkpoints", name))))
    run_dir = Path(options.out)
    if dist.is_main and run_dir.exists() and any(run_dir.glob("*.safetensors")):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it "
                          f"or choose another --out")
    return run_dir


# What a fine-tune takes from the model it starts from: the shape (and with it the tokenizer).
_SHAPE = ("cell", "residual", "hidden_size", "num_layers", "embed_size", "tie_weights", "tokenizer")


def _plan_fine_tune(options: TrainOptions, given: Collection[str], dist: Any, note: Callable[[str], None] | None,
                    corpus: str | None, val_source: str | None, run_name: str | None,
                    max_minutes: float | None) -> RunPlan:
    """A new run that starts from a trained model: its shape and vocabulary (extended with the new
    text's symbols on ``--extend-vocab``), a fresh optimizer and schedule. Tokens the model never
    saw become ``<UNK>`` otherwise, and the plan's notes say how many."""
    from charlm.data.tokenstore import prepare_corpus, spooled
    from charlm.model.checkpoint import load_checkpoint, resolve_checkpoint
    from charlm.data.tokenizer import extend_tokenizer

    from charlm.model.lm import resolve_device
    from charlm.model.precision import resolve_precision

    base = load_checkpoint(resolve_checkpoint(options.init_from))
    precision = resolve_precision(options.precision, resolve_device(options.device), cell=base.model_config.cell)
    shape = {**base.model_config.to_dict(), "tokenizer": base.tokenizer.kind}
    for key in _SHAPE:
        if key in given and getattr(options, key) != shape[key]:
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(options, key)} conflicts with the model given "
                              f"to --init-from, which has {shape[key]}; a fine-tune keeps the model's shape")
    for key in ("min_count", "max_vocab"):
        if key in given and not options.extend_vocab:
            raise ConfigError(f"--{key.replace('_', '-')} applies to the new symbols of --extend-vocab only; "
                              f"without it the vocabulary is the model's")
    tokenizer = base.tokenizer
    # --extend-vocab reads the corpus twice (its new symbols, then the ids): a pipe is copied once first.
    with spooled([corpus, val_source] if options.extend_vocab else [None, None]) as (spooled_corpus, spooled_val):
        if options.extend_vocab:
            corpus, val_source = spooled_corpus, spooled_val
            _, fitted = dist.main_first(lambda: prepare_corpus(
                corpus, kind=tokenizer.kind, val_fraction=options.val_fraction,
                min_count=_min_count(dataclasses.replace(options, tokenizer=tokenizer.kind)),
                max_vocab=options.max_vocab, val_path=val_source, encoding_errors=options.encoding_errors,
                on_note=note, include=options.include, exclude=options.exclude))
            tokenizer = extend_tokenizer(tokenizer, fitted.tokenizer)
        corpus_data, data = dist.main_first(lambda: prepare_corpus(
            corpus, val_fraction=options.val_fraction, tokenizer=tokenizer, val_path=val_source,
            encoding_errors=options.encoding_errors, on_note=note, include=options.include,
            exclude=options.exclude))
    before = base.train_config or TrainConfig()
    optimizer = options.optimizer or before.optimizer
    model_cfg = dataclasses.replace(
        base.model_config, vocab_size=tokenizer.vocab_size, **{
            key: _given_or(getattr(options, key), getattr(base.model_config, key))
            for key in ("dropout", "input_dropout", "embed_dropout", "weight_drop")})
    train_cfg = TrainConfig(
        tf32=options.tf32,
        seq_len=_given_or(options.seq_len, before.seq_len), batch_size=_given_or(options.batch_size, before.batch_size),
        lr=_given_or(options.lr, before.lr if optimizer == before.optimizer else
                     OPTIMIZER_LR.get(optimizer, {}).get(base.tokenizer.kind, before.lr)),
        weight_decay=options.weight_decay if "weight_decay" in given else before.weight_decay,
        clip=options.clip if "clip" in given else before.clip, optimizer=optimizer,
        warmup_steps=options.warmup_steps, min_lr_ratio=_given_or(options.min_lr_ratio, before.min_lr_ratio),
        epochs=options.epochs,
        max_steps=options.max_steps, max_minutes=max_minutes, val_fraction=options.val_fraction,
        eval_every=options.eval_every, patience=options.patience, seed=options.seed, device=options.device,
        max_bad_steps=options.max_bad_steps, log_every=_given_or(options.log_every, DEFAULT_LOG_EVERY),
        activation_reg=_given_or(options.activation_reg, before.activation_reg),
        temporal_reg=_given_or(options.temporal_reg, before.temporal_reg), precision=precision.name,
        average=_given_or(options.average, before.average), average_power=_given_or(options.average_power, before.average_power),
        shift_windows=_given_or(options.shift_windows, before.shift_windows), cache=options.cache)
    notes = []
    if added := tokenizer.vocab_size - base.tokenizer.vocab_size:
        notes.append(f"note: --extend-vocab added {added:,} token(s) the model had never seen; their embedding "
                     f"and output rows start fresh, the other {base.tokenizer.vocab_size:,} are the model's")
    if unknown := tokenizer.count_unknown(data.train_ids):
        notes.append(f"note: {unknown:,} training tokens are not in the vocabulary of the model given to "
                     f"--init-from and are read as <UNK> (--extend-vocab learns them instead)")
    run_dir = _new_run_dir(options, dist, run_name or corpus_data.name)
    weights = {name: tensor.detach().cpu() for name, tensor in base.model.state_dict().items()}
    return RunPlan(model_cfg, train_cfg, data, run_dir, corpus_data.source, val_source, notes=notes,
                   init_weights=weights, corpus_options=_corpus_options(options, corpus_data),
                   precision_reason=precision.reason)


_TEXT_OPTIONS = ("tokenizer", "cell", "optimizer", "device", "precision", "encoding_errors", "corpus", "val_file", "out", "resume", "init_from")


def options_from(values: dict[str, Any]) -> TrainOptions:
    """``TrainOptions`` from keyword values, refusing a name that is not an option (with the list)."""
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; the options are "
                          f"{', '.join(sorted(known))}")
    for key in _TEXT_OPTIONS:
        nullable = key not in ("tokenizer", "cell", "device", "precision", "encoding_errors")
        if key in values and not (isinstance(values[key], str) or (nullable and values[key] is None)):
            raise ConfigError(f"{key} must be a string{' or None' if nullable else ''} "
                              f"(got {type(values[key]).__name__})")
    for key in ("tie_weights", "residual", "extend_vocab", "average", "shift_windows", "cache", "tf32"):
        if key in values and not (isinstance(values[key], bool) or (key not in ("extend_vocab", "cache", "tf32")
                                                                    and values[key] is None)):
            raise ConfigError(f"{key} must be True or False (got {type(values[key]).__name__})")
    for key in ("include", "exclude"):  # lists from the command line, tuples in the options
        patterns = values.get(key) or ()
        if isinstance(patterns, str):  # include="*.c": one pattern, not its characters
            patterns = (patterns,)
        if not (isinstance(patterns, (list, tuple)) and all(isinstance(p, str) and p for p in patterns)):
            raise ConfigError(f"{key} must be a file name pattern or a list of them (got {patterns!r:.80})")
        values = {**values, key: tuple(patterns)}
    return TrainOptions(**values)
