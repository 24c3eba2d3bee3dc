"""The Python API. The command line is built on exactly these calls.

    import charlm
    lm = charlm.load("checkpoints/tinyshakespeare")           # a .safetensors file or a run folder
    for piece in lm.generate("ROMEO:", length=200, temperature=0.8, seed=1):
        print(piece, end="")
    lm.perplexity(open("valid.txt").read())                   # nats/token, bits/char, perplexity, <UNK>
    lm.score(["The apple and pear salad.", "The apple and pair salad."])
    run = charlm.train("corpus.txt", max_minutes=3)            # the CLI's defaults; returns a TrainResult
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from charlm.config import SampleConfig, brief
from charlm.errors import UsageError
from charlm.infer.batched import generate_batch as _generate_batch
from charlm.infer.dynamic import dynamic_settings, evaluate_dynamic
from charlm.infer.evaluate import evaluate
from charlm.infer.pointer import evaluate_with_cache
from charlm.infer.sample import Piece, beam_search, prime_ids
from charlm.infer.sample import generate as _generate
from charlm.infer.score import LineScore, LineSelection, NumberedScore, ScoredText, score_lines
from charlm.infer.surprise import PieceLogprob, line_logprobs, text_logprobs
from charlm.model.checkpoint import Checkpoint, checkpoint_report, load_checkpoint, resolve_checkpoint
from charlm.model.export import DEFAULT_OPSET, CheckedExport, export_checkpoint
from charlm.model.lm import resolve_device
from charlm.model.precision import FP32, resolve_precision
from charlm.training import loop as trainer
from charlm.training.distributed import from_env, shutdown
from charlm.training.loop import TrainResult
from charlm.training.options import TrainOptions, options_from
from charlm.training.plan import plan_run
from charlm.training.plot import LossCurves, read_loss_curves


def _text(name: str, value: Any, *, optional: bool = False) -> None:
    """Refuse a non-string where text belongs (a UsageError naming the argument, not a TypeError)."""

    if not (isinstance(value, str) or (optional and value is None)):
        raise UsageError(f"{name} must be a string{' or None' if optional else ''} (got {type(value).__name__} "
                         f"{brief(value)})")


def _paths(**values: Any) -> None:
    """Refuse what is neither a path nor None where a file or folder belongs (a UsageError naming
    the argument)."""
    for name, value in values.items():
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise UsageError(f"{name} must be a path (got {type(value).__name__})")


def _flag(name: str, value: Any) -> None:
    """Refuse a non-bool where a switch belongs (``1`` or ``"yes"`` is not silently truthy)."""

    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False (got {type(value).__name__})")


WORD_CAVEAT = ("a word model is not charged for the whitespace its tokenizer normalises nor for spelling "
               "out <UNK> words, so its bits/char and bits/byte are lower bounds, not comparable with a char or "
               "byte model's as they stand")


@dataclass(frozen=True)
class Perplexity:
    """How well a model predicts a text. ``bits_per_char`` and ``bits_per_byte`` divide by the
    text's characters and UTF-8 bytes, so they compare char and byte models (enwik8 results are
    per byte); a word model's are lower bounds (``caveat``). ``unknown_tokens`` were scored as
    ``<UNK>``."""

    tokens: int
    predicted_tokens: int
    characters: int
    unknown_tokens: int
    total_nats: float
    nats_per_token: float
    bits_per_char: float
    perplexity: float
    unknown: tuple[str, ...]  # the unknown characters or words themselves (at most 50)
    bytes: int = 0  # of the text in UTF-8
    bits_per_byte: float = float("nan")  # what enwik8-style results report
    caveat: str | None = None  # what the per-character figures leave out (word models), else None
    precision: str = "fp32"  # the matmuls'
    # The checkpoint's cache pointer (window, theta, weight) when the figures above used it; the
    # model alone's figures are then the *_without_cache ones (the same pass). With ``dynamic`` it
    # names the pointer of the cache_* figures instead.
    cache: dict[str, Any] | None = None
    nats_per_token_without_cache: float | None = None
    perplexity_without_cache: float | None = None
    # Dynamic evaluation (dynamic.py): its settings (lr, decay, window) when the figures above are
    # the adapting model's; beside them the model as trained (static_*) and, where the checkpoint
    # has a cache pointer and ``cache`` is on, the model as trained with it (cache_*) and the
    # adapting model with it (dynamic_cache_*; its λ was fitted to the model as trained).
    dynamic: dict[str, Any] | None = None
    static_nats_per_token: float | None = None
    static_perplexity: float | None = None
    cache_nats_per_token: float | None = None
    cache_perplexity: float | None = None
    dynamic_cache_nats_per_token: float | None = None
    dynamic_cache_perplexity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON gives it (``/v1/perplexity`` and ``charlm perplexity --json``)."""
        return {**dataclasses.asdict(self), "unknown": list(self.unknown)}


class LanguageModel:
    """A trained model with its tokenizer: generate text, and score or measure text with it."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.path = checkpoint.path

    def __repr__(self) -> str:
        cfg = self.checkpoint.model_config
        return (f"LanguageModel({str(self.path)!r}: {cfg.num_layers}×{cfg.hidden_size} {cfg.cell.upper()}, "
                f"{self.tokenizer.kind} tokenizer, {self.tokenizer.vocab_size:,} tokens)")

    def stream(self, prime: str = "", *, length: int = 500, temperature: float = 0.8, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: str | None = None,
               num_samples: int = 1, precision: str = "auto") -> Iterator[Piece]:
        """``num_samples`` samples generated as one batch, a ``Piece(stream, text, done)`` per token.
        ``precision``: auto and fp32 step in fp32; bf16 steps faster where the hardware has it, its
        log-probabilities within ~0.1 of fp32's."""
        _text("prime", prime)
        _text("precision", precision)
        config = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, length=length,
                              num_samples=num_samples, seed=seed, stop=stop)
        return _generate(self.model, self.tokenizer, config=config, prime=prime, precision=precision)

    def generate(self, prime: str = "", *, length: int = 500, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | None = None, precision: str = "auto", beam: int | None = None) -> Iterator[str]:
        """The text that follows ``prime``, a piece (token) at a time. The same seed gives the same
        text as ``charlm sample --seed``; temperature (default 0.8) 0 is always the most likely token.
        ``beam=N``: no sampling, the most likely text of ``length`` tokens a beam of N hypotheses
        finds (N=1 is temperature 0), yielded once found; the sampling options do not apply to it.

        >>> "".join(lm.generate("ROMEO:", length=50, seed=1))  # doctest: +SKIP
        >>> "".join(lm.generate("ROMEO:", length=50, beam=8))  # doctest: +SKIP
        """
        if beam is not None:
            yield from self._beam(prime, length=length, beam=beam, precision=precision,
                                  sampling={"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
                                            "stop": stop})
            return
        for piece in self.stream(prime, length=length, temperature=0.8 if temperature is None else temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop=stop, precision=precision):
            if piece.text:
                yield piece.text

    def _beam(self, prime: str, *, length: int, beam: int, precision: str,
              sampling: dict[str, Any]) -> Iterator[str]:

        given = [name for name, value in sampling.items() if value is not None]
        if given:
            raise UsageError(f"beam search picks the most likely text, it does not sample: {', '.join(given)} "
                             f"cannot be given with beam")
        _text("prime", prime)
        if precision not in ("auto", "fp32"):
            raise UsageError(f"beam search runs in fp32; precision must be auto or fp32 (got {precision!r})")
        ids, _ = beam_search(self.model, self.tokenizer, prime=prime, length=length, beam=beam)
        decoder = self.tokenizer.decoder()
        if self.tokenizer.kind == "word" and prime and not prime.endswith("\n"):
            decoder.feed(int(prime_ids(self.tokenizer, prime)[-1]))  # continue the prime's line, as sampling does
        for token_id in ids:
            text = decoder.feed(token_id)
            if text:
                yield text

    def generate_batch(self, prompts: Sequence[str], *, length: int = 500, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None,
                       seed: int | Sequence[int | None] | None = None, stop: str | None = None,
                       precision: str = "auto") -> list[str]:
        """The text that follows each of ``prompts``, generated together: one batch steps them all,
        so many prompts cost little more than one. ``seed``: one for every prompt, a list with one
        per prompt, or None (a random seed each). Each text is what ``generate`` gives its prompt
        with its seed, but for the rounding of a larger batch (infer/batched.py): a rare sampled
        draw can differ, argmax (temperature 0) in practice not.

        >>> lm.generate_batch(["ROMEO:", "JULIET:"], length=50, seed=[1, 2])  # doctest: +SKIP
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise UsageError(f"prompts must be a list of strings (got {type(prompts).__name__}); "
                             f"lm.generate(prompt) generates from one")
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            _text(f"prompts[{i}]", prompt)
        _text("precision", precision)
        if seed is None or isinstance(seed, int):
            seeds: list[Any] = [seed] * len(prompts)
        elif isinstance(seed, Sequence) and not isinstance(seed, str):
            seeds = list(seed)
            if len(seeds) != len(prompts):
                raise UsageError(f"seed must hold one seed per prompt ({len(prompts)}; got {len(seeds)})")
        else:
            raise UsageError(f"seed must be a whole number, a list of them or None (got {type(seed).__name__})")
        configs = [SampleConfig(temperature=0.8 if temperature is None else temperature, top_k=top_k, top_p=top_p,
                                length=length, seed=one, stop=stop) for one in seeds]
        return [texts[0] for texts in _generate_batch(self.model, self.tokenizer, list(zip(prompts, configs)),
                                                      precision=precision)]

    def samples(self, prime: str = "", *, num_samples: int, **options: Any) -> list[str]:
        """``num_samples`` whole samples (without the prime), generated together."""
        texts = [""] * num_samples
        for piece in self.stream(prime, num_samples=num_samples, **options):
            texts[piece.stream] += piece.text
        return texts

    def perplexity(self, text: str, *, precision: str = "auto", cache: bool = True, dynamic: bool = False,
                   dynamic_lr: float | None = None, dynamic_decay: float | None = None,
                   dynamic_window: int | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Perplexity:
        """Score ``text`` in one pass: each token predicted from everything before it.
        ``precision``: auto and fp32 compute in fp32, so figures compare across machines and
        with training's validation loss; bf16 is faster and within 2e-3 nats/token.
        ``cache``: use the checkpoint's cache pointer, if training fitted one (pointer.py); the
        result then has the model alone's figures too. ``dynamic``: dynamic evaluation (Krause et
        al. 2018, dynamic.py), a copy of the model adapting to the text as it reads it, with rate
        ``dynamic_lr``, decay ``dynamic_decay`` and a step every ``dynamic_window`` tokens (None:
        the defaults for the model's tokenizer); the static figures, and with the cache pointer
        the static and the adapting model's, are then beside it, and neither the model nor its
        file changes. ``should_stop`` is asked
        between windows; True stops with ``charlm.errors.Cancelled``."""

        _text("text", text)
        _text("precision", precision)
        _flag("cache", cache)
        _flag("dynamic", dynamic)
        given = [f"--dynamic-{name}" for name, value in (("lr", dynamic_lr), ("decay", dynamic_decay),
                                                         ("window", dynamic_window)) if value is not None]
        if given and not dynamic:
            raise UsageError(f"{', '.join(given)} applies to dynamic evaluation: add --dynamic (dynamic=True)")
        settings = dynamic_settings(self.tokenizer.kind, lr=dynamic_lr, decay=dynamic_decay,
                                    window=dynamic_window) if dynamic else None
        chosen = FP32 if precision == "auto" else resolve_precision(precision, self.model.embedding.weight.device,
                                                                     cell=self.model.cfg.cell)
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise UsageError(f"the text needs at least 2 tokens to score (has {len(ids)})")
        pointer, without = self.checkpoint.cache if cache else None, None
        static = cached = both = None
        if settings is not None:
            both, result = evaluate_dynamic(self.model, ids, settings, precision=chosen, cache=pointer,
                                            should_stop=should_stop)
            both = both if pointer is not None else None
            if pointer is not None:
                cached, static = evaluate_with_cache(self.model, ids, pointer, precision=chosen,
                                                     should_stop=should_stop)
            else:
                static = evaluate(self.model, ids, precision=chosen, should_stop=should_stop)
        elif pointer is not None:
            result, without = evaluate_with_cache(self.model, ids, pointer, precision=chosen, should_stop=should_stop)
        else:
            result = evaluate(self.model, ids, precision=chosen, should_stop=should_stop)
        unknown = self.tokenizer.count_unknown(ids)
        num_bytes = len(text.encode("utf-8", errors="surrogatepass"))
        return Perplexity(
            tokens=int(len(ids)), predicted_tokens=result.num_predicted, characters=len(text),
            unknown_tokens=unknown, total_nats=result.total_nats, nats_per_token=result.nats_per_token,
            bits_per_char=result.bits_per_char(len(text)), perplexity=result.perplexity,
            unknown=tuple(self.tokenizer.unknown_symbols(text)[:50]) if unknown else (),
            bytes=num_bytes, bits_per_byte=result.bits_per_char(num_bytes),
            caveat=WORD_CAVEAT if self.tokenizer.kind == "word" else None, precision=chosen.name,
            cache=pointer.to_dict() if pointer is not None else None,
            nats_per_token_without_cache=without.nats_per_token if without is not None else None,
            perplexity_without_cache=without.perplexity if without is not None else None,
            dynamic=settings.to_dict() if settings is not None else None,
            static_nats_per_token=static.nats_per_token if static is not None else None,
            static_perplexity=static.perplexity if static is not None else None,
            cache_nats_per_token=cached.nats_per_token if cached is not None else None,
            cache_perplexity=cached.perplexity if cached is not None else None,
            dynamic_cache_nats_per_token=both.nats_per_token if both is not None else None,
            dynamic_cache_perplexity=both.perplexity if both is not None else None)

    def logprobs(self, text: str, *, top: int = 5, from_line_start: bool = True, max_tokens: int | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[PieceLogprob]:
        """How surprised the model is by each piece of ``text`` (a character; a word for word
        models): its log-probability in nats and the ``top`` tokens the model expected there.
        ``from_line_start`` predicts the first piece from a line start as ``score`` does; without
        it the first token is only read, as ``perplexity`` does, and its ``logprob`` is None.

        >>> [(p.text, round(p.logprob, 2)) for p in lm.logprobs("ROMEO:")]  # doctest: +SKIP
        """

        _text("text", text)
        _flag("from_line_start", from_line_start)
        return text_logprobs(self.model, self.tokenizer, text, top=top, from_line_start=from_line_start,
                             max_tokens=max_tokens, should_stop=should_stop)

    def score(self, lines: Sequence[str], *, include_end: bool = True, logprobs: bool = False,
              top: int = 5, should_stop: Callable[[], bool] | None = None) -> list[LineScore]:
        """Each line scored on its own, from a fresh line start (lower nats/token = more likely).
        ``logprobs``: each ``LineScore.logprobs`` holds the line's pieces as ``logprobs()`` gives
        them (``top`` alternatives each), adding up to minus its ``total_nats``."""


        if isinstance(lines, str):
            raise UsageError("score takes a list of lines, not one string (lm.score([text]) scores one line; "
                             "lm.perplexity(text) scores a whole text)")
        lines = list(lines)
        for i, line in enumerate(lines):
            _text(f"lines[{i}]", line)
        _flag("include_end", include_end)
        _flag("logprobs", logprobs)
        scores = score_lines(self.model, self.tokenizer, lines, include_end=include_end, should_stop=should_stop)
        if not logprobs:
            return scores
        return [replace(line, logprobs=tuple(line_logprobs(self.model, self.tokenizer, lines[line.index],
                                                           include_end=include_end, top=top,
                                                           should_stop=should_stop)))
                for line in scores]


def load(where: str | os.PathLike[str] | None = None, *, device: str = "cpu",
         root: str | os.PathLike[str] = "checkpoints") -> LanguageModel:
    """A checkpoint file, a run folder (its best checkpoint), or (None) the newest run under ``root``.

    >>> lm = charlm.load("checkpoints/tinyshakespeare")  # doctest: +SKIP
    """
    _paths(where=where, root=root)
    _text("device", device)
    return LanguageModel(load_checkpoint(resolve_checkpoint(where, root=root), device=str(resolve_device(device))))


def train(corpus: str | os.PathLike[str] | None = None, options: TrainOptions | None = None, *,
          on_event: Callable[[dict[str, Any]], None] | None = None,
          should_stop: Callable[[], str | None] | None = None, on_note: Callable[[str], None] | None = None,
          **overrides: Any) -> TrainResult:
    """Train a model on ``corpus`` (a file, a folder, a registry name, or None for the built-in text)
    with the same defaults and checks as ``charlm train``. The options are ``TrainOptions``' fields
    (the command line's names, docs/options.md): as keyword arguments (``max_minutes=3``,
    ``hidden_size=512``, ``resume="checkpoints/run"``), as a ``TrainOptions`` object an editor
    completes, or both (keywords win). Returns a ``TrainResult``.

    The options given are the keywords passed and the object's fields that differ from their
    defaults; a resumed run honours or refuses each of them. ``on_event`` receives the progress
    events, ``should_stop`` is polled after each step (an answer such as "SIGINT" saves and stops),
    ``on_note`` receives one-line notes.

    >>> run = charlm.train("corpus.txt", max_minutes=3)  # doctest: +SKIP
    >>> run = charlm.train("corpus.txt", charlm.TrainOptions(max_minutes=3, cell="gru"))  # doctest: +SKIP
    """
    if corpus is not None and not isinstance(corpus, (str, os.PathLike)):
        raise UsageError(f"corpus must be a path, a corpus name or None (got {type(corpus).__name__})")
    if options is not None and not isinstance(options, TrainOptions):
        raise UsageError(f"options must be a TrainOptions (got {type(options).__name__})")
    chosen = {} if options is None else {
        f.name: getattr(options, f.name) for f in dataclasses.fields(TrainOptions)
        if getattr(options, f.name) != f.default and f.name != "corpus"}
    values = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in {**chosen, **overrides}.items()}
    if corpus is None and options is not None:
        corpus = options.corpus
    opts = options_from({**values, "corpus": None if corpus is None else os.fspath(corpus)})
    opts.check()
    dist = from_env(opts.device)
    try:
        plan = plan_run(opts, given=set(values), dist=dist, on_note=on_note)
        if on_note is not None and dist.is_main:
            for note in plan.notes:
                on_note(note)
        return trainer.train(model_config=plan.model_config, train_config=plan.train_config, data=plan.data,
                             run_dir=plan.run_dir, source=plan.source, on_event=on_event, should_stop=should_stop,
                             resume=plan.resume, dist=dist, val_source=plan.val_source,
                             init_weights=plan.init_weights,
                             corpus_options=plan.corpus_options, precision_reason=plan.precision_reason,
                             sizing=plan.sizing)
    finally:
        shutdown(dist)


# ── what the CLI's info, plot, export and score commands show, for Python ───────────────────────

def _checkpoint_file(where: str | os.PathLike[str] | None, root: str | os.PathLike[str]) -> Path:
    _paths(where=where, root=root)
    return resolve_checkpoint(where, root=root)


def info(where: str | os.PathLike[str] | None = None, *, root: str | os.PathLike[str] = "checkpoints") -> dict[str, Any]:
    """What a checkpoint holds (configs, vocabulary size, parameters, training state, cache pointer),
    JSON-ready, as ``charlm info --json`` prints it; ``where`` as ``load`` takes it.

    >>> charlm.api.info("checkpoints/tinyshakespeare")["parameters"]  # doctest: +SKIP
    """
    return checkpoint_report(load_checkpoint(_checkpoint_file(where, root)))


def loss_curves(run: str | os.PathLike[str] | None = None, *,
                root: str | os.PathLike[str] = "checkpoints") -> LossCurves:
    """A run's training and validation loss against step, read from its metrics.jsonl, as ``charlm
    plot`` shows them: ``.to_dict()``, ``.chart(width=, height=)`` (text) and ``.save_png(path)``.
    ``run`` is a run folder, or None for the newest run under ``root``.

    >>> print(charlm.api.loss_curves("checkpoints/tinyshakespeare").chart())  # doctest: +SKIP
    """
    _paths(run=run)
    return read_loss_curves(run if run is not None else _checkpoint_file(None, root).parent)


def export_onnx(out: str | os.PathLike[str], *, checkpoint: str | os.PathLike[str] | None = None,
                batch_size: int | None = None, opset: int = DEFAULT_OPSET, check: bool | None = None,
                root: str | os.PathLike[str] = "checkpoints") -> CheckedExport:
    """Export a checkpoint's model to ONNX as one time step at ``out`` (a ``.onnx.json`` description
    beside it), as ``charlm export`` does; ``check`` runs the graph beside the model with
    onnxruntime (None: where it is installed). Needs ``pip install "charlm[export]"``.

    >>> charlm.api.export_onnx("model.onnx", checkpoint="checkpoints/tinyshakespeare")  # doctest: +SKIP
    """
    if not isinstance(out, (str, os.PathLike)):
        raise UsageError(f"out must be a path (got {type(out).__name__})")
    for name, value in (("batch_size", batch_size), ("opset", opset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"{name} must be a whole number (got {type(value).__name__})")
    if check is not None:
        _flag("check", check)
    return export_checkpoint(load_checkpoint(_checkpoint_file(checkpoint, root)), out, batch_size=batch_size,
                             opset=opset, check=check)


def score_text(text: str, checkpoint: str | os.PathLike[str] | None = None, *, sort: str = "input",
               top: int | None = None, include_end: bool = True, skip_empty: bool = True, device: str = "cpu",
               root: str | os.PathLike[str] = "checkpoints", name: str = "the text") -> ScoredText:
    """Each line of ``text`` scored on its own, as ``charlm score`` shows them: empty lines left out
    unless ``skip_empty`` is False, in text order or ``sort`` best or worst first, the first ``top``
    (None: all). ``name`` is what a refusal calls the text.

    >>> [row.line for row in charlm.api.score_text(open("lines.txt").read(), sort="best").lines]  # doctest: +SKIP
    """
    _text("text", text)
    _text("name", name)
    selection = LineSelection(sort=sort, top=top, skip_empty=skip_empty)
    numbered = selection.numbered(text)
    if not numbered:
        raise UsageError(f"{name}: has no lines to score")
    lm = load(checkpoint, device=device, root=root)
    scores = lm.score([line for _, line in numbered], include_end=include_end)
    rows = [NumberedScore(number, score) for (number, _), score in zip(numbered, scores)]
    return ScoredText(lm.path, lm.tokenizer.kind, include_end, tuple(selection.arrange(rows)))
