"""The training options, each declared once: its name, type, default (or "chosen by the planner"),
range, help, group and resume policy.

``charlm train``'s command line (cli), ``charlm.train``'s keyword checks (``options_from``), the
resume rules (``FIXED_ON_RESUME``, ``ADJUSTABLE_ON_RESUME``, ``NOT_ON_RESUME``) and the options
reference (docs/options.md, ``reference_markdown``) are all derived from ``TrainOptions`` below.
Adding an option is one field here plus its use in the planner (plan.py). Imports nothing heavy:
the CLI builds its ``train`` command from this module before torch is loaded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from charlm.config import (CELLS, DEVICES, ENCODING_ERRORS, LIMITS, OPTIMIZERS, PRECISIONS, TOKENIZERS, Range,
                           TrainConfig, brief, check_decay, check_option)
from charlm.errors import ConfigError

DEFAULT_MINUTES = 3.0  # the budget when no stopping rule is given
DEFAULT_LOG_EVERY = 10
_TRAIN = TrainConfig()  # the loop's own defaults, which the options share

# The groups ``charlm train --help`` and docs/options.md list the options under, in this order.
CORPUS = "Corpus"
MODEL = "Model"
REGULARISATION = "Regularisation"
OPTIMISATION = "Optimisation"
STOPPING = "Stopping and evaluation"
RUN = "The run"
STARTING = "Resuming and fine-tuning"
GROUPS = (CORPUS, MODEL, REGULARISATION, OPTIMISATION, STOPPING, RUN, STARTING)

# What ``--resume`` does with an option the user gives: it must equal the run's value (FIXED),
# replaces it for the rest of the run (ADJUSTABLE), is refused whatever its value (REFUSED), or
# says where the run's text and files are, which the planner reads as the run did unless given (INPUT).
FIXED = "fixed"
ADJUSTABLE = "adjustable"
REFUSED = "refused"
INPUT = "input"
POLICIES = (FIXED, ADJUSTABLE, REFUSED, INPUT)

_VOCABULARY_IS_THE_CHECKPOINTS = "the vocabulary is the checkpoint's"


@dataclass(frozen=True)
class Spec:
    """How an option is shown and treated, beside its name, type and default (the field's)."""

    group: str
    resume: str
    help: str
    argument: bool = False  # the command line's positional argument, not an --option
    path: bool = False  # a file or folder: a ``Path`` on the command line, a string here
    refused_because: str | None = None  # REFUSED options: why, in the error message


def option(default: Any, group: str, resume: str, *, help: str, argument: bool = False, path: bool = False,
           because: str | None = None) -> Any:
    """One option's declaration, as a dataclass field of ``TrainOptions``."""
    if group not in GROUPS or resume not in POLICIES or (resume == REFUSED) != (because is not None):
        raise ValueError(f"a mistaken option declaration ({group}, {resume})")
    return dataclasses.field(default=default, metadata={"spec": Spec(group, resume, help, argument, path, because)})


# The choices of the options that take one word from a list.
CHOICES: dict[str, tuple[str, ...]] = {"tokenizer": TOKENIZERS, "cell": CELLS, "optimizer": OPTIMIZERS,
                                       "device": DEVICES, "precision": PRECISIONS,
                                       "encoding_errors": ENCODING_ERRORS}


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``charlm train`` accepts, by the option's name. ``None`` means "not given": the
    planner chooses (each option's help says how); a given 0 is a value."""

    corpus: str | None = option(
        None, CORPUS, INPUT, argument=True,
        help=('UTF-8 text file to train on, a folder of them (read recursively; see --include), or a corpus name '
              "from 'charlm corpus list' (after 'charlm corpus get NAME'). Default: Python's built-in documentation"
              ' text (offline).'))
    include: tuple[str, ...] = option(
        (), CORPUS, INPUT,
        help=("A folder corpus: read only files whose names match this pattern (e.g. '*.c'; repeat for more). "
              'Default: every file but hidden ones. Binary and non-UTF-8 files are skipped and counted.'))
    exclude: tuple[str, ...] = option(
        (), CORPUS, INPUT,
        help=("A folder corpus: leave out files and folders whose names match this pattern (e.g. 'site-packages', "
              "'test_*'; repeat for more)."))
    tokenizer: str = option(
        'char', CORPUS, FIXED,
        help='char, word or byte.')
    cell: str = option(
        'lstm', MODEL, FIXED,
        help='lstm, gru, rnn (tanh) or peephole (an LSTM whose gates also see the cell state; docs/cells.md).')
    optimizer: str | None = option(
        None, OPTIMISATION, FIXED,
        help=('adamw, sgd (plain, as the PyTorch word-LM example: --lr 20 for words, --clip 0.25), adagrad or '
              'rmsprop (decay 0.95, as char-rnn). All use the warm-up + cosine schedule; the non-AdamW ones default'
              ' to no weight decay. Default: sgd for word models, adamw otherwise (measured: docs/word-models.md).'))
    hidden_size: int | None = option(
        None, MODEL, FIXED,
        help='Hidden units per layer. Default: sized to the corpus and budget.')
    num_layers: int | None = option(
        None, MODEL, FIXED,
        help='Recurrent layers. Default: 1 on a CPU (one wide layer learns fastest per CPU-second), 3 on a GPU.')
    embed_size: int | None = option(
        None, MODEL, FIXED,
        help='Embedding width. Default: min(hidden, 128) on a CPU, min(hidden, 256) on a GPU; hidden when tied.')
    dropout: float | None = option(
        None, REGULARISATION, FIXED,
        help=("Variational dropout (one mask per stream and window) between layers and on the last layer's output, "
              'and on the embeddings unless --input-dropout (half as much for char and byte models). Default: from '
              'the expected number of epochs.'))
    input_dropout: float | None = option(
        None, REGULARISATION, FIXED,
        help=('Variational dropout on the embedding output (one mask per stream and window). Default: half of '
              '--dropout for char and byte models, as auto-sized for word models.'))
    embed_dropout: float | None = option(
        None, REGULARISATION, FIXED,
        help=("Drop whole tokens: every use of a dropped token's embedding in a batch (AWD-LSTM). Default: by "
              'expected epochs (0 for char models).'))
    weight_drop: float | None = option(
        None, REGULARISATION, FIXED,
        help=('DropConnect on the hidden-to-hidden weights, a new mask each window; the fused kernel still runs. '
              'Default: by expected epochs.'))
    activation_reg: float | None = option(
        None, REGULARISATION, FIXED,
        help="AR: add this × the mean square of the last layer's outputs to the loss. Default: 0.")
    temporal_reg: float | None = option(
        None, REGULARISATION, FIXED,
        help='TAR: add this × the mean square of their change from step to step. Default: 0.')
    tie_weights: bool | None = option(
        None, MODEL, FIXED,
        help='Share embedding and output weights. Default: on for word models.')
    residual: bool | None = option(
        None, MODEL, FIXED,
        help=('Skip connections between stacked layers: each layer after the first adds its input to its output '
              '(needs --num-layers ≥ 2). Default: off.'))
    seq_len: int | None = option(
        None, OPTIMISATION, FIXED,
        help='BPTT window length. Default: 100 (35 for words, 256 on a GPU).')
    batch_size: int | None = option(
        None, OPTIMISATION, FIXED,
        help='Parallel streams. Default on a CPU: 16 up to 512 hidden units, 32 above (32 for words); 64 on a GPU.')
    lr: float | None = option(
        None, OPTIMISATION, ADJUSTABLE,
        help='Peak AdamW learning rate. Default: by model size.')
    weight_decay: float = option(
        _TRAIN.weight_decay, OPTIMISATION, ADJUSTABLE,
        help='AdamW weight decay (weights only).')
    clip: float = option(
        _TRAIN.clip, OPTIMISATION, ADJUSTABLE,
        help='Gradient-norm clipping threshold (0 = off).')
    warmup_steps: int = option(
        _TRAIN.warmup_steps, OPTIMISATION, FIXED,
        help='Linear warm-up steps before the cosine decay (at most a tenth of a step/epoch limit).')
    min_lr_ratio: float | None = option(
        None, OPTIMISATION, ADJUSTABLE,
        help=('The cosine decay ends at this fraction of --lr. Default: 0; with --average, as sized for the '
              'tokenizer (1, a constant rate, for word models).'))
    average: bool | None = option(
        None, OPTIMISATION, FIXED,
        help=("Evaluate and save the average of the run's weights (step t weighs t^P, P = --average-power), not the"
              " last step's: a high learning rate then still ends at a quiet point (AWD-LSTM's averaged SGD). "
              'Default: on for word models whose budget buys 8 or more epochs, with a constant rate.'))
    average_power: float | None = option(
        None, OPTIMISATION, FIXED,
        help=('How much --average leans on recent steps: 0 weighs the whole run equally; with P the mean age of '
              'what is averaged is 1/(P+2) of the run (0–20; giving it turns --average on). Default: 2.'))
    shift_windows: bool | None = option(
        None, OPTIMISATION, FIXED,
        help=("Start each epoch's BPTT windows at a different offset (0 to --seq-len − 1, drawn from the seed and "
              'the epoch), so a token is not always at the same place in its window (AWD-LSTM varies the length for'
              ' this). Default: on where the budget buys 8 or more epochs of a word model, 3 or more of a char or '
              'byte model.'))
    cache: bool = option(
        True, RUN, ADJUSTABLE,
        help=('When the run ends, fit a cache pointer (Grave et al. 2017) to the best checkpoint on the validation '
              "split: the model's next-token distribution mixed with the tokens that followed similar moments of "
              'the recent past. It is stored in the checkpoint, kept only where it lowers the validation loss by '
              "0.01 nats/token or more, and used by 'charlm perplexity' unless --no-cache. Its time is bounded and "
              'counted: at most a tenth of --max-minutes (kept inside it), or of the training time (at least 2 s) '
              'for --epochs/--max-steps runs; Ctrl-C skips it and keeps the checkpoints.'))
    epochs: int | None = option(
        None, STOPPING, ADJUSTABLE,
        help='Stop after this many passes over the data.')
    max_steps: int | None = option(
        None, STOPPING, ADJUSTABLE,
        help='Stop after this many steps.')
    max_minutes: float | None = option(
        None, STOPPING, ADJUSTABLE,
        help=f"Time budget, the final evaluation and the cache pointer fit included (with --resume: the whole run's, time already spent included). Default: {DEFAULT_MINUTES:g} when no --epochs/--max-steps.")
    val_fraction: float = option(
        _TRAIN.val_fraction, CORPUS, FIXED,
        help='The LAST fraction of the corpus kept for validation.')
    val_file: str | None = option(
        None, CORPUS, INPUT, path=True,
        help='Validate on this file instead; all of CORPUS is then training text.')
    eval_every: int | None = option(
        None, STOPPING, ADJUSTABLE,
        help=('Evaluate every N steps. Default: under a time budget every twentieth of it, but at most ~3% of the '
              'time spent evaluating; 10 times per step/epoch limit; always at the end.'))
    patience: int | None = option(
        None, STOPPING, ADJUSTABLE,
        help='Stop after N evaluations without improvement.')
    seed: int = option(
        _TRAIN.seed, RUN, FIXED,
        help='Random seed.')
    device: str = option(
        _TRAIN.device, RUN, ADJUSTABLE,
        help='auto, cpu, cuda or mps.')
    tf32: bool = option(
        True, RUN, ADJUSTABLE,
        help=("On a CUDA GPU, let float32 matmuls and cuDNN's recurrences use TF32 tensor cores (10-bit mantissa "
              'products, float32 sums); --no-tf32 keeps exact float32. No effect on a CPU. Adjustable on --resume.'))
    precision: str = option(
        'auto', RUN, ADJUSTABLE,
        help=("auto, fp32, bf16 or fp16: the matmuls' number format in training (validation is fp32). auto: bf16 on"
              ' a GPU with bf16 and on a CPU with native bf16 (AVX-512 BF16 or AMX), fp32 elsewhere; the start line'
              ' says which and why. fp16 (CUDA only) trains with a loss scaler. Kept by --resume unless given.'))
    out: str | None = option(
        None, RUN, INPUT, path=True,
        help='Run folder. Default: checkpoints/<corpus name>/ (a new -N folder if taken).')
    min_count: int | None = option(
        None, CORPUS, REFUSED, because=_VOCABULARY_IS_THE_CHECKPOINTS,
        help=('Keep words (or characters) seen at least this often; the rest are <UNK>. Default: 2 for words (so '
              '<UNK> is trained), 1 otherwise.'))
    max_vocab: int | None = option(
        None, CORPUS, REFUSED, because=_VOCABULARY_IS_THE_CHECKPOINTS,
        help='Keep at most this many tokens, the most frequent (<UNK> included).')
    resume: str | None = option(
        None, STARTING, INPUT, path=True,
        help='Continue the run in this folder exactly where it stopped.')
    init_from: str | None = option(
        None, STARTING, INPUT, path=True,
        help=('Fine-tune: start a new run from this checkpoint or run folder: its shape and vocabulary (fixed), its'
              ' dropout, --seq-len, --batch-size and --lr unless given; a fresh optimizer and schedule. Unseen '
              'tokens become <UNK>.'))
    extend_vocab: bool = option(
        False, STARTING, INPUT,
        help=("With --init-from: add the new text's unseen tokens to the vocabulary (new embedding and output rows;"
              ' the old rows unchanged).'))
    encoding_errors: str = option(
        'strict', CORPUS, INPUT,
        help='strict, replace or ignore invalid UTF-8.')
    max_bad_steps: int = option(
        _TRAIN.max_bad_steps, STOPPING, ADJUSTABLE,
        help='Stop after this many NaN/Inf steps in a row.')
    log_every: int | None = option(
        None, RUN, ADJUSTABLE,
        help=f'Write the mean training loss to metrics.jsonl every N steps. Default: {DEFAULT_LOG_EVERY}.')

    def check(self) -> None:
        """Every option against its declaration (its choices, its range in config.LIMITS) and the
        rules between options, before any work is done."""
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(choices)} (got {brief(value)})")
        for name in NUMERIC_OPTIONS:
            check_option(name, getattr(self, name), optional=True)
        if self.lr is not None:
            check_decay(lr=self.lr, weight_decay=self.weight_decay)
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


@dataclass(frozen=True)
class Declared:
    """One option as declared: what the command line, the checks and the docs are built from."""

    name: str
    kind: str  # "text", "int", "float", "bool" or "patterns" (a tuple of file name patterns)
    default: Any  # None: chosen by the planner
    spec: Spec

    @property
    def flag(self) -> str:
        return "--" + _flag(self.name)

    @property
    def nullable(self) -> bool:
        """Whether None ("not given: the planner chooses") is a value of this option."""
        return self.default is None

    @property
    def choices(self) -> tuple[str, ...] | None:
        return CHOICES.get(self.name)

    @property
    def range(self) -> Range | None:
        return LIMITS.get(self.name) if self.kind in ("int", "float") else None


# A field's type, as written in TrainOptions, to the option's kind.
_KINDS = {"str": "text", "str | None": "text", "int": "int", "int | None": "int", "float": "float",
          "float | None": "float", "bool": "bool", "bool | None": "bool", "tuple[str, ...]": "patterns"}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _declared() -> tuple[Declared, ...]:
    return tuple(Declared(f.name, _KINDS[str(f.type)], f.default, f.metadata["spec"])
                 for f in dataclasses.fields(TrainOptions))


DECLARED: tuple[Declared, ...] = _declared()
BY_NAME: dict[str, Declared] = {option.name: option for option in DECLARED}
NUMERIC_OPTIONS = tuple(o.name for o in DECLARED if o.kind in ("int", "float"))
FIXED_ON_RESUME = tuple(o.name for o in DECLARED if o.spec.resume == FIXED)
ADJUSTABLE_ON_RESUME = tuple(o.name for o in DECLARED if o.spec.resume == ADJUSTABLE)
NOT_ON_RESUME = {o.name: o.spec.refused_because for o in DECLARED if o.spec.resume == REFUSED}
# The options a resumed run honours or refuses (resume.resume_configs); INPUT ones are the planner's.
RESUME_KEYS = FIXED_ON_RESUME + ADJUSTABLE_ON_RESUME + tuple(NOT_ON_RESUME)


def options_from(values: dict[str, Any]) -> TrainOptions:
    """``TrainOptions`` from keyword values, refusing a name that is not an option (with the list)
    and a value of the wrong type (ranges and choices are ``TrainOptions.check``'s)."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; the options are "
                          f"{', '.join(sorted(BY_NAME))}")
    values = dict(values)
    for name, value in values.items():
        declared = BY_NAME[name]
        if value is None and (declared.nullable or declared.kind == "patterns"):
            values[name] = declared.default  # not given: None means "none" for patterns too
            continue
        if declared.kind == "text" and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string{' or None' if declared.nullable else ''} "
                              f"(got {type(value).__name__})")
        if declared.kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False (got {type(value).__name__})")
        if declared.kind == "patterns":  # lists from the command line, tuples in the options
            patterns = (value,) if isinstance(value, str) else value  # include="*.c": one pattern
            if not (isinstance(patterns, (list, tuple)) and all(isinstance(p, str) and p for p in patterns)):
                raise ConfigError(f"{name} must be a file name pattern or a list of them (got {value!r:.80})")
            values[name] = tuple(patterns)
    return TrainOptions(**values)


_POLICY_WORDS = {FIXED: "kept (must match)", ADJUSTABLE: "may change", REFUSED: "refused", INPUT: "read as the run did"}


def reference_markdown() -> str:
    """docs/options.md: every option of ``charlm train`` by group, with its default, range and
    what ``--resume`` does with it (tests/test_options.py keeps the file equal to this)."""
    lines = ["# `charlm train` options", "",
             "Generated from the option declarations in `charlm/training/options.py` "
             "(`python -m charlm.training.options > docs/options.md`); the same names are "
             "`charlm.train()`'s keyword arguments and `TrainOptions`' fields. "
             "\"planner\" as a default means charlm chooses (docs/choosing.md says how). "
             "On `--resume`, an option is kept (a given value must match the run's), may change for the rest "
             "of the run, is refused, or says where the text is (read as the run did unless given).", ""]
    for group in GROUPS:
        lines += [f"## {group}", "", "| option | default | values | on --resume | what it does |",
                  "|---|---|---|---|---|"]
        for option in (o for o in DECLARED if o.spec.group == group):
            lines.append(f"| {_shown_name(option)} | {_shown_default(option)} | {_shown_values(option)} | "
                         f"{_POLICY_WORDS[option.spec.resume]} | {_escaped(option.spec.help)} |")
        lines.append("")
    return "\n".join(lines)


def _escaped(text: str) -> str:
    return text.replace("|", "\\|")


def _shown_name(option: Declared) -> str:
    if option.spec.argument:
        return f"`{option.name.upper()}` (argument)"
    if option.kind == "bool" and option.default is not False:
        return f"`{option.flag}` / `--no-{_flag(option.name)}`"
    return f"`{option.flag}`"


def _shown_default(option: Declared) -> str:
    if option.default is None:
        return "planner"
    if option.kind == "bool":
        return "on" if option.default else "off"
    if option.kind == "patterns":
        return "all files"
    return f"`{option.default}`"


def _shown_values(option: Declared) -> str:
    if option.choices:
        return ", ".join(option.choices)
    if option.range is not None:
        return option.range.describe()
    return {"bool": "on/off", "patterns": "file name patterns", "text": "a path" if option.spec.path else "text"}[
        option.kind]


if __name__ == "__main__":
    print(reference_markdown())
