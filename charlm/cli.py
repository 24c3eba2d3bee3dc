"""The ``charlm`` command line: parse options → build configs → call the library → render.

The only module that prints, exits, or knows about terminals. Heavy imports (torch) happen inside
the commands so ``charlm --help`` stays fast.
"""
from __future__ import annotations

import errno
import math
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from charlm import __version__
from charlm import jsonio
from charlm.config import TrainConfig
from charlm.errors import CharlmError, is_out_of_memory
from charlm.cli_options import with_declared_options

app = typer.Typer(
    name="charlm",
    help="Train recurrent language models (LSTM, GRU, RNN) on a text file, sample from them, and score text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Control characters a terminal would obey (ESC starts colour, title and clipboard sequences; CR
# and BS overwrite; the bidirectional overrides reorder what is shown), C1 controls and DEL.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe_text(text: str) -> str:
    """``text`` as a terminal shows it without obeying it: control characters written as escapes
    (``\\x1b``, ``\\u202e``); newlines and tabs kept. Every string from a file passes through this."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class _SafeConsole(Console):
    """A console that prints strings as text: no markup (a ``[`` in a path is a bracket) and no
    control characters (``safe_text``)."""

    def print(self, *objects: Any, **options: Any) -> None:  # noqa: A003 - rich's name
        options.setdefault("markup", False)
        super().print(*(_safe_renderable(o) for o in objects), **options)


def _safe_renderable(value: Any) -> Any:
    if isinstance(value, Text):
        return Text(safe_text(value.plain), style=value.style, justify=value.justify, overflow=value.overflow)
    return safe_text(value) if isinstance(value, str) else value


class _Table(Table):
    """A table whose cells are text, never markup, with control characters escaped."""

    def add_row(self, *cells: Any, **options: Any) -> None:
        super().add_row(*(Text(safe_text(c)) if isinstance(c, str) else _safe_renderable(c) for c in cells),
                        **options)


err = _SafeConsole(stderr=True, highlight=False, soft_wrap=True, markup=False)
console = _SafeConsole(highlight=False, soft_wrap=True, markup=False)

_TRAIN = TrainConfig()  # the configs' defaults, stated once


def _error(message: str, code: int) -> typer.Exit:
    err.print(f"charlm: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _handled() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code; never a traceback."""
    try:
        yield
        _flush_stdout()  # a full disk or a closed pipe shows here, not at exit after the message
    except CharlmError as exc:
        raise _error(str(exc), exc.exit_code) from None
    except KeyboardInterrupt as exc:
        err.print(f"charlm: interrupted{f' ({exc})' if isinstance(exc, _Signalled) else ''}", markup=False)
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    except OutputLost as exc:
        raise _error(str(exc), 1) from None
    except (MemoryError, RuntimeError) as exc:
        # The library names what ran out where it can (OutOfMemoryError); anything it did not
        # wrap still ends as one line, not an allocator's traceback.
        if not is_out_of_memory(exc):
            raise
        raise _error("out of memory; make the model (--hidden-size, --num-layers), --batch-size or "
                     "--num-samples smaller", 1) from None


# ── standard output that can vanish ────────────────────────────────────────────────────────────

class OutputLost(Exception):
    """Standard output cannot take what a command writes: closed, a full disk, a reader gone."""


_OUTPUT_REASONS = {errno.EPIPE: "the reader went away (broken pipe)", errno.ENOSPC: "no space left on the device",
                   errno.EBADF: "it is closed"}


class _GuardedStdout:
    """``sys.stdout`` while a command runs: a failed write or flush becomes ``OutputLost``, and
    the real descriptor is then pointed at /dev/null so that the flush at exit stays quiet."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _lost(self, exc: OSError) -> OutputLost:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        reason = _OUTPUT_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        return OutputLost(f"cannot write to standard output: {reason}")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise self._lost(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._lost(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _flush_stdout() -> None:
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError as exc:  # not guarded (a library caller's own stream)
            raise OutputLost(f"cannot write to standard output: "
                             f"{_OUTPUT_REASONS.get(exc.errno or 0, exc.strerror or str(exc))}") from None


def _write_text(text: str) -> None:
    """Generated text to stdout: as it is into a file or pipe, with control characters escaped
    on a terminal (a downloaded model's vocabulary can hold escape sequences)."""
    sys.stdout.write(safe_text(text) if _stdout_is_terminal() else text)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _version(value: bool) -> None:
    if value:
        console.print(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """charlm: train, sample and score recurrent language models on any text file.

    Example: charlm train corpus.txt && charlm sample --temperature 0.8
    """


# ── train ───────────────────────────────────────────────────────────────────────────────────────

class _TrainDisplay:
    """Renders training events: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, *, live: bool) -> None:
        self.live = live and err.is_terminal
        self.budget: float | None = None
        self.progress = None
        self.task = None
        self.total_steps: int | None = None
        self.last_eval: dict[str, Any] | None = None  # carries the run's best so far
        self.step_info = ""
        self.stop_flag: "_StopFlag | None" = None  # told what a Ctrl-C does while the cache pointer is fitted

    def __enter__(self) -> "_TrainDisplay":
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.description}"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=err, transient=False)
            self.progress.__enter__()
            self.task = self.progress.add_task("starting…", total=1000)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _fraction(self, event: dict[str, Any]) -> float:
        parts = [0.0]
        if self.total_steps:
            parts.append(event["step"] / self.total_steps)
        if self.budget:
            parts.append(event.get("elapsed", 0.0) / self.budget)
        return min(1.0, max(parts))

    def per_unit(self, nats_per_token: float, bits_per_char: float) -> str:
        """Bits per byte for a byte model (what enwik8 results report), else bits per character."""
        if getattr(self, "tokenizer", None) == "byte":
            return f"{nats_per_token / math.log(2):.4f} bits/byte"
        return f"{bits_per_char:.4f} bits/char"

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self.total_steps = event["total_steps"]
            self.budget = event["max_minutes"] * 60 if event.get("max_minutes") else None
            self.tokenizer = event.get("tokenizer")
            cfg = event["model_config"]
            err.print(f"charlm: {cfg['num_layers']}×{cfg['hidden_size']} {cfg['cell'].upper()}"
                      f"{' (residual)' if cfg.get('residual') else ''}, "
                      f"{event['num_parameters']:,} parameters, {event['train_tokens']:,} training / "
                      f"{event['val_tokens']:,} validation tokens, device {event['device']}, "
                      f"{event['precision']} ({event['precision_reason']})"
                      + (f", evaluating the weights' average (power {event['train_config']['average_power']:g})"
                         if event["train_config"].get("average") else "")
                      + (" (resumed)" if event["resumed"] else ""), markup=False)
        elif kind == "warning":
            err.print(f"charlm: warning: {event['message']}", markup=False)
        elif kind == "step":
            val = f" · val {self.last_eval['val_loss']:.4f}" if self.last_eval is not None else ""
            self.step_info = (f"step {event['step']:,} · loss {event['loss']:.4f}{val} · "
                              f"{event['tokens_per_second'] / 1000:.1f}k tok/s")
            self._update(event)
        elif kind == "eval":
            self.last_eval = event
            line = (f"step {event['step']:,}: val loss {event['val_loss']:.4f} nats/token, "
                    + self.per_unit(event["val_loss"], event["val_bpc"]) + (" (best)" if event["improved"] else ""))
            if self.progress is not None:
                self.progress.console.print(line, markup=False)
            else:
                err.print(line, markup=False)
            self._update(event)
        elif kind == "cache_start":
            if self.stop_flag is not None:
                self.stop_flag.doing = "skipping the cache pointer fit; the checkpoints are kept…"
            self.step_info = f"fitting the cache pointer (at most {event['seconds']:.0f} s; Ctrl-C skips it)"
            if self.progress is None:
                err.print(f"charlm: {self.step_info}", markup=False)
            self._describe()
        elif kind == "cache_progress":
            what = "reading the validation text" if event["phase"] == "reading" else "searching"
            self.step_info = (f"cache pointer: {what} {min(event['done'], event['total'])}/{event['total']} "
                              f"(Ctrl-C skips it)")
            self._describe()
        elif kind == "cache":
            without, found = event["val_loss_without"], event["cache"]
            if found is None:
                line = (f"cache pointer: none kept (the best found gained less than 0.01 nats/token on "
                        f"{event['tokens']:,} validation tokens; {event['seconds']:.0f} s)")
            else:
                line = (f"cache pointer: validation {event['val_loss']:.4f} nats/token with it, {without:.4f} "
                        f"without (perplexity {math.exp(min(event['val_loss'], 700)):.3f} against "
                        f"{math.exp(min(without, 700)):.3f}; window {found['window']:,}, θ {found['theta']:g}, "
                        f"λ {found['weight']:g}, fitted on these {event['tokens']:,} tokens in {event['seconds']:.0f} s)")
            if event.get("cut_short"):
                line += f"; its {event['allowance']:.0f} s ran out during the search: the best point tried is kept"
            err.print(line, markup=False)
        elif kind == "bad_step":
            err.print(f"charlm: warning: non-finite loss at step {event['step']}, step skipped", markup=False)

    def _describe(self) -> None:
        """The bar's text only (its position stays where training left it)."""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=self.step_info)

    def _update(self, event: dict[str, Any]) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=1000 * self._fraction(event), description=self.step_info)


class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM before training started: nothing to save, so the work stops at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.exit_code = 143 if name == "SIGTERM" else 130


class _StopFlag:
    """SIGINT/SIGTERM ask the trainer to stop after the current step; a second Ctrl-C aborts.
    Before training starts (reading, tokenizing, planning: nothing to save yet) either one stops
    at once, even in a read that waits on a pipe."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.started = False  # the trainer's "start" event has come
        self.doing = "finishing this step and saving…"  # what the first request does now
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.started:
            raise _Signalled(signal.Signals(signum).name)
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        err.print(f"\ncharlm: {self.reason}: {self.doing}", markup=False)

    def seen(self, event: dict[str, Any]) -> None:
        if event.get("event") == "start":
            self.started = True

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> str | None:
        return self.reason


@app.command()
@with_declared_options  # every option of training/options.py, then the command line's own below
def train(
    ctx: typer.Context,
    *,
    sample_length: Annotated[int, typer.Option(help="Length of the sample printed at the end (0 = none).", rich_help_panel="Output")] = 300,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result (and sample) instead.", rich_help_panel="Output")] = False,
    **declared: Any,
) -> None:
    """Train a model on CORPUS and keep the best and last checkpoints.

    Example: charlm train tinyshakespeare.txt --max-minutes 10
    """
    with _handled():
        from charlm.api import train as run_training
        from charlm.config import check_option
        from charlm.training.distributed import launched_by_torchrun

        check_option("sample_length", sample_length)  # the CLI's own option; the library checks the rest

        # The library plans the run (plan.plan_run); the CLI passes what was typed and renders.
        # Only what was typed: the defaults are the declaration's, and a resumed run refuses or honours
        # exactly the options given.
        corpus = declared["corpus"]
        options = {name: (str(value) if isinstance(value, Path) else value) for name, value in declared.items()
                   if name != "corpus" and _given(ctx, name)}
        main_process = not launched_by_torchrun() or os.environ.get("RANK", "0").strip() in ("0", "")
        display = _TrainDisplay(live=main_process)
        with _StopFlag() as stop, display:
            stop.started = not main_process  # torchrun's other ranks see no events: they keep the graceful stop
            display.stop_flag = stop

            def on_event(event: dict[str, Any]) -> None:
                stop.seen(event)
                display(event)

            result = run_training(corpus, on_event=on_event, should_stop=stop,
                                  on_note=lambda message: err.print(f"charlm: {message}", markup=False),
                                  **options)
        run_dir = result.run_dir
        if result.stopped_by == "interrupt":
            if main_process:
                err.print(f"charlm: stopped at step {result.step:,}; saved {run_dir / 'last.safetensors'}. "
                          f"Resume with: charlm train --resume {run_dir}", markup=False)
            raise typer.Exit(143 if stop.reason == "SIGTERM" else 130)
        if not main_process:
            return
        if not math.isfinite(result.best_val_loss):
            raise _usage("training ended before any evaluation")
        # A stop request after training (during the cache pointer fit) skipped the fit; the run is
        # complete, and its result is printed, but no sample is drawn and SIGTERM still ends with 143.
        if stop.reason is not None:
            sample_length = 0
        # The run's best, which after --resume may come from before it: not this session's last improvement.
        if as_json:
            sample_text = ("".join(_end_of_training_sample(result.best_checkpoint, length=sample_length, seed=declared["seed"]))
                           if sample_length > 0 else None)
            sys.stdout.write(jsonio.dumps({
                "run": str(run_dir), "checkpoint": str(result.best_checkpoint), "best_val_loss": result.best_val_loss,
                "best_val_bpc": result.best_val_bpc, "best_val_perplexity": math.exp(min(result.best_val_loss, 700)),
                "best_step": result.best_step, "steps": result.step, "elapsed_seconds": result.elapsed_seconds,
                "stopped_by": result.stopped_by, "num_parameters": result.num_parameters,
                "eval_seconds": result.eval_seconds, "cache_seconds": result.cache_seconds,
                "cache": _cache_json(result.cache),
                "sample": sample_text}) + "\n")
            if stop.reason == "SIGTERM":
                raise typer.Exit(143)
            return
        _print_loss_chart(run_dir)
        console.print(f"best val loss {result.best_val_loss:.4f} nats/token · "
                      f"{display.per_unit(result.best_val_loss, result.best_val_bpc)} · "
                      f"perplexity {math.exp(min(result.best_val_loss, 700)):.3f} (step {result.best_step:,} of "
                      f"{result.step:,}, {result.elapsed_seconds:.0f} s, evaluation "
                      f"{result.eval_seconds:.0f} s"
                      + (f", cache pointer fit {result.cache_seconds:.0f} s" if result.cache_seconds else "")
                      + f", stopped: {result.stopped_by})", markup=False)
        console.print(f"checkpoints: {result.best_checkpoint}", markup=False)
        if sample_length > 0:
            console.print("sample:", markup=False)
            for text in _end_of_training_sample(result.best_checkpoint, length=sample_length, seed=declared["seed"]):
                _write_text(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        if stop.reason == "SIGTERM":
            raise typer.Exit(143)


def _cache_json(found: Any) -> dict[str, Any] | None:
    """The cache pointer a run fitted, for --json (None: not fitted)."""
    if found is None:
        return None
    return {"pointer": found.cache.to_dict() if found.cache else None, "val_loss": found.nats_per_token,
            "val_loss_without": found.nats_per_token_without, "tokens": found.tokens, "seconds": found.seconds}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line), as opposed to its default."""
    source = ctx.get_parameter_source(name)  # click's ParameterSource (Typer may vendor click)
    return getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def _print_loss_chart(run_dir: Path) -> None:
    """The run's loss curves as plain text on stderr (no extra dependency, no colour codes)."""
    from charlm.training.plot import read_metrics, terminal_chart

    try:
        metrics = read_metrics(run_dir)
    except CharlmError:
        return
    if len(metrics.train) >= 2:
        err.print(terminal_chart(metrics, width=60, height=10), markup=False, highlight=False)


def _end_of_training_sample(path: Path, *, length: int, seed: int) -> Iterator[str]:
    """The pieces of the short sample ``train`` ends with (temperature 0.8, the run's seed)."""
    from charlm.api import load

    yield from load(path).generate(length=length, temperature=0.8, seed=seed)


# ── sample ──────────────────────────────────────────────────────────────────────────────────────

@app.command()
def sample(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run under checkpoints/.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = always the most likely token.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample only from the K most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sample from the smallest set of tokens whose probability reaches P.")] = None,
    prime: Annotated[str, typer.Option(help="Text to start from (printed first).")] = "",
    prime_file: Annotated[Optional[Path], typer.Option(help="Read the prime text from a file.")] = None,
    length: Annotated[int, typer.Option(help="Tokens to generate (chars, words or bytes).")] = 500,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated as one batch.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed gives the same text.")] = None,
    stop: Annotated[Optional[str], typer.Option(help="End a sample at this string (not printed); '<EOS>' ends a word model's line.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "cpu",
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16 for the matmuls of each step. auto is fp32 (exact); bf16 is faster for many --num-samples on hardware with fast bf16, its log-probabilities within ~0.1 of fp32's.")] = "auto",
    beam: Annotated[Optional[int], typer.Option(help="Beam search: the most likely text of --length tokens that N hypotheses find (1 = always the most likely token), printed once found; the sampling options do not apply.")] = None,
) -> None:
    """Generate text from a trained model, streamed to stdout as it is produced.

    Example: charlm sample --prime "ROMEO:" --temperature 0.7 --length 300 --seed 1
    """
    with _handled():
        from charlm.api import load
        from charlm.config import SampleConfig, brief, check_precision
        from charlm.data.text import read_corpus

        SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, length=length, num_samples=num_samples,
                     seed=seed, stop=stop)  # checks every option before the model is loaded
        check_precision(precision)
        if prime_file is not None:
            if prime:
                raise _usage("give --prime or --prime-file, not both")
            prime = read_corpus(prime_file)
        if beam is not None:  # a sampling option given with it is refused, not ignored
            sources = {name: ctx.get_parameter_source(name) for name in ("temperature", "top_k", "top_p", "seed",
                                                                         "stop", "num_samples")}
            given = [f"--{name.replace('_', '-')}" for name, source in sources.items()
                     if source is not None and source.name != "DEFAULT"]
            if given:
                raise _usage(f"--beam picks the most likely text, it does not sample: {', '.join(given)} cannot be "
                             f"given with it")
        lm = load(checkpoint, device=device)
        if lm.tokenizer.kind == "word" and (unknown := lm.tokenizer.unknown_symbols(prime)):
            err.print(f"charlm: warning: {len(unknown)} prime word(s) not in the vocabulary, read as <UNK>: "
                      f"{' '.join(brief(word) for word in unknown[:8])}", markup=False)
        separate = num_samples > 1
        buffers: list[list[str]] = [[] for _ in range(num_samples)]
        # The library checks the prime and the stop string when the stream is made, so a refused
        # prime is never echoed first.
        pieces = lm.stream(prime, length=length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           stop=stop, num_samples=num_samples, precision=precision)
        if separate:
            sys.stdout.write("──── sample 1 ────\n")
        _write_text(prime)
        sys.stdout.flush()
        if beam is not None:
            for text in lm.generate(prime, length=length, beam=beam, precision=precision):
                sys.stdout.write(text)
            sys.stdout.write("\n")
            sys.stdout.flush()
            return
        # The first sample streams live; the others are printed whole once generated.
        for piece in pieces:
            if piece.stream == 0:
                _write_text(piece.text)
                sys.stdout.flush()
            else:
                buffers[piece.stream].append(piece.text)
        sys.stdout.write("\n")
        for i in range(1, num_samples):
            sys.stdout.write(f"──── sample {i + 1} ────\n")
            _write_text(f"{prime}{''.join(buffers[i])}\n")
        sys.stdout.flush()


def _usage(message: str) -> CharlmError:
    from charlm.errors import UsageError

    return UsageError(message)


# ── perplexity ──────────────────────────────────────────────────────────────────────────────────

@app.command()
def perplexity(
    file: Annotated[Path, typer.Argument(help="Held-out UTF-8 text to score.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto or fp32: exact fp32 figures, comparable across machines and with training's validation loss; bf16: faster, within 2e-3 nats/token.")] = "auto",
    encoding_errors: Annotated[str, typer.Option(help="strict, replace or ignore invalid UTF-8.")] = "strict",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Use the cache pointer that training fitted to this checkpoint, if any (the model's distribution mixed with the tokens that followed similar moments of the text's recent past; see 'charlm train --cache'). The model alone's figures are printed beside it. --no-cache: the model alone, in the faster batched pass.")] = True,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic evaluation (Krause et al. 2018): a copy of the model adapts to the text as it reads it, one gradient step after scoring each window, decaying towards the trained weights; the checkpoint never changes. The static figures (and the cache pointer's) are printed beside it. Slower: a backward pass per window.")] = False,
    dynamic_lr: Annotated[Optional[float], typer.Option(help="With --dynamic: the rate η, how far each weight moves per step in units of its RMS-normalised gradient (0–1). Default: 0.002.")] = None,
    dynamic_decay: Annotated[Optional[float], typer.Option(help="With --dynamic: the decay λ, the share of the way back to the trained weights each step (0–1). Default: 0.008.")] = None,
    dynamic_window: Annotated[Optional[int], typer.Option(help="With --dynamic: tokens scored between two steps. Default: 5 for word models, 20 for char and byte models.")] = None,
) -> None:
    """Score held-out text: nats/token, perplexity, and bits/char and bits/byte (comparable across char and byte models; a word model's are lower bounds).

    Example: charlm perplexity heldout.txt --checkpoint checkpoints/tinyshakespeare
    """
    with _handled():
        from charlm.api import load
        from charlm.config import check_precision
        from charlm.data.text import read_corpus

        check_precision(precision)
        text = read_corpus(file, encoding_errors=encoding_errors)
        lm = load(checkpoint, device=device)
        t0 = time.perf_counter()
        result = lm.perplexity(text, precision=precision, cache=cache, dynamic=dynamic, dynamic_lr=dynamic_lr,
                               dynamic_decay=dynamic_decay, dynamic_window=dynamic_window)
        seconds = time.perf_counter() - t0
        report = {"file": str(file), "checkpoint": str(lm.path), "tokenizer": lm.tokenizer.kind, **result.to_dict(),
                  "seconds": seconds}
        if as_json:
            sys.stdout.write(jsonio.dumps(report) + "\n")
            return
        table = _Table(show_header=False, box=None)
        for label, value in (("tokens", f"{report['tokens']:,}"), ("characters", f"{report['characters']:,}"),
                             ("<UNK> tokens", f"{report['unknown_tokens']:,}"),
                             ("nats/token", f"{report['nats_per_token']:.4f}"),
                             ("bits/char" + ("*" if result.caveat else ""), f"{report['bits_per_char']:.4f}"),
                             ("bits/byte" + ("*" if result.caveat else ""), f"{report['bits_per_byte']:.4f}"),
                             ("perplexity", f"{report['perplexity']:.3f}")):
            table.add_row(label, value)
        if result.dynamic is not None:
            table.add_row("static (as trained)", f"{result.static_nats_per_token:.4f} nats/token, "
                                                 f"perplexity {result.static_perplexity:.3f}")
            if result.cache is not None:
                table.add_row("static + cache pointer", f"{result.cache_nats_per_token:.4f} nats/token, "
                                                        f"perplexity {result.cache_perplexity:.3f}")
                table.add_row("dynamic + cache pointer", f"{result.dynamic_cache_nats_per_token:.4f} nats/token, "
                                                         f"perplexity {result.dynamic_cache_perplexity:.3f}")
        elif result.cache is not None:
            table.add_row("model alone", f"{result.nats_per_token_without_cache:.4f} nats/token, "
                                         f"perplexity {result.perplexity_without_cache:.3f}")
        console.print(table)
        if result.dynamic is not None:
            d = result.dynamic
            err.print(f"charlm: dynamic evaluation: the model adapted to the text as it read it (rate {d['lr']:g}, "
                      f"decay {d['decay']:g}, a step every {d['window']:,} tokens)"
                      + "; the checkpoint is unchanged", markup=False)
        elif result.cache is not None:
            err.print(f"charlm: with the checkpoint's cache pointer (window {result.cache['window']:,} tokens, "
                      f"θ {result.cache['theta']:g}, λ {result.cache['weight']:g}; --no-cache for the model alone)",
                      markup=False)
        if result.caveat:
            err.print(f"charlm: * {result.caveat}", markup=False)
        if result.unknown_tokens:
            err.print(f"charlm: note: {result.unknown_tokens:,} tokens are not in the model's vocabulary "
                      f"(scored as <UNK>): {' '.join(repr(u) for u in result.unknown[:8])}", markup=False)


# ── info ────────────────────────────────────────────────────────────────────────────────────────

@app.command()
def info(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Show what a checkpoint holds: configs, vocabulary, parameters and training state.

    Example: charlm info checkpoints/tinyshakespeare
    """
    with _handled():
        from charlm.model.checkpoint import checkpoint_report, load_checkpoint, resolve_checkpoint

        resolved = resolve_checkpoint(checkpoint)
        loaded = load_checkpoint(resolved)
        report = checkpoint_report(loaded)
        if as_json:
            sys.stdout.write(jsonio.dumps(report) + "\n")
            return
        table = _Table(show_header=False, box=None)
        table.add_row("checkpoint", str(resolved))
        mc = loaded.model_config
        table.add_row("model", f"{mc.num_layers}×{mc.hidden_size} {mc.cell.upper()}, embedding {mc.embed_size}"
                               + (", tied weights" if mc.tie_weights else "")
                               + (", residual connections" if mc.residual else ""))
        table.add_row("regularisation", ", ".join(
            [f"dropout {mc.dropout:g}"]
            + ([f"input dropout {mc.input_dropout:g}"] if mc.input_dropout is not None else [])
            + [f"{name} {value:g}" for name, value in (("embedding dropout", mc.embed_dropout),
                                                       ("weight drop", mc.weight_drop)) if value]))
        table.add_row("parameters", f"{report['parameters']:,}")
        table.add_row("tokenizer", f"{loaded.tokenizer.kind}, {loaded.tokenizer.vocab_size:,} tokens")
        state = loaded.train_state
        if state:
            table.add_row("trained", f"step {_count(state.get('step'))} (epoch {_count(state.get('epoch'))}), "
                                     f"{_count(state.get('tokens_seen'))} tokens, "
                                     f"{_seconds(state.get('elapsed_seconds'))}")
            best = state.get("best_val_loss")
            if isinstance(best, (int, float)) and math.isfinite(best):
                table.add_row("best val loss", f"{best:.4f} nats/token at step {_count(state.get('best_step'))}")
            table.add_row("corpus", str(state.get("corpus") or "?"))
        if loaded.train_config:
            cfg = loaded.train_config
            table.add_row("training", f"{cfg.optimizer}, batch {cfg.batch_size} × seq {cfg.seq_len}, lr {cfg.lr:g}, "
                                      f"weight decay {cfg.weight_decay:g}, clip {cfg.clip:g}, seed {cfg.seed}, "
                                      f"{cfg.precision}"
                                      + "".join(f", {name} {value:g}" for name, value in
                                                (("AR", cfg.activation_reg), ("TAR", cfg.temporal_reg)) if value)
                                      + (f", averaged weights (power {cfg.average_power:g})" if cfg.average else "")
                                      + (", windows shifted each epoch" if cfg.shift_windows else ""))
        if loaded.cache is not None:
            table.add_row("cache pointer", f"window {loaded.cache.window:,} tokens, θ {loaded.cache.theta:g}, "
                                           f"λ {loaded.cache.weight:g} (used by perplexity)")
        console.print(table)


def _count(value: Any) -> str:
    """A count from a checkpoint's training state, or '?' where it lacks one."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "?"


def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if isinstance(value, (int, float)) and math.isfinite(value) else "? s"


# ── bench ───────────────────────────────────────────────────────────────────────────────────────

@app.command()
def bench(
    cell: Annotated[str, typer.Option(help="lstm, gru, rnn or peephole.")] = "lstm",
    hidden_size: Annotated[int, typer.Option(min=1, help="Hidden units per layer.")] = 512,
    num_layers: Annotated[int, typer.Option(min=1, help="Recurrent layers.")] = 2,
    embed_size: Annotated[int, typer.Option(min=1, help="Embedding width.")] = 128,
    vocab_size: Annotated[int, typer.Option(min=2, max=256, help="Vocabulary size (char models: ~65).")] = 65,
    batch_size: Annotated[int, typer.Option(min=1, help="Training streams.")] = 64,
    seq_len: Annotated[int, typer.Option(min=1, help="Training window.")] = 128,
    steps: Annotated[int, typer.Option(min=20, help="Training steps per repeat (the first third is warm-up).")] = 40,
    sample_streams: Annotated[int, typer.Option(min=1, max=10_000, help="Streams for the batched sampling figure.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Repeats; each figure is their median.")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="Also measure with bf16 matmuls. Default: where the hardware has fast bf16 (what --precision auto picks).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Measure training, evaluation, sampling and tokenization speed on this machine.

    Synthetic data of the given shape goes through charlm's real trainer, evaluator, sampler and
    tokenizer; each figure is the median of --repeats runs.

    Example: charlm bench --hidden-size 512 --batch-size 64 --seq-len 128 --json
    """
    with _handled():
        from charlm.bench import BenchConfig, run_bench
        from charlm.config import CELLS
        from charlm.errors import ConfigError

        if cell not in CELLS:
            raise ConfigError(f"--cell must be one of {', '.join(CELLS)} (got {cell!r})")
        cfg = BenchConfig(cell=cell, hidden_size=hidden_size, num_layers=num_layers, embed_size=embed_size,
                          vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, train_steps=steps,
                          sample_streams=sample_streams, repeats=repeats, device=device, bf16=bf16)
        result = run_bench(cfg, on_progress=lambda what: err.print(f"charlm: measuring {what}…", markup=False))
        if as_json:
            console.print_json(jsonio.dumps(result.to_dict()))
            return
        table = _Table(title=f"charlm bench · {num_layers}×{hidden_size} {cell.upper()} · {result.device}")
        low = result.bf16 or {}
        table.add_column("what")
        table.add_column("fp32 (median)", justify="right")
        if low:
            table.add_column("bf16 (median)", justify="right")

        def row(what: str, fp32: float, key: str | None, unit: str) -> None:
            cells = [f"{fp32:,.0f} {unit}"]
            if low:
                cells.append("" if not key else "unavailable" if low[key] is None else f"{low[key]:,.0f} {unit}")
            table.add_row(what, *cells)

        row(f"training (batch {batch_size} × seq {seq_len})", result.train_tokens_per_second,
            "train_tokens_per_second", "tokens/s")
        row("bare nn.LSTM training loop, same shape", result.bare_train_tokens_per_second,
            "bare_train_tokens_per_second", "tokens/s")
        row("evaluation (perplexity)", result.eval_tokens_per_second, "eval_tokens_per_second", "tokens/s")
        row("sampling, 1 stream", result.sample_chars_per_second_1, None, "chars/s")
        row("bare nn.LSTM one-token loop, 1 stream", result.bare_sample_chars_per_second_1, None, "chars/s")
        row(f"sampling, {sample_streams} streams", result.sample_chars_per_second_n, "sample_chars_per_second_n",
            "chars/s")
        row("char tokenization", result.tokenize_mb_per_second, None, "MB/s")
        row("dense matmul", result.matmul_gflops, "matmul_gflops", "GFLOP/s")
        row("peak memory", result.peak_memory_mb, None, "MB")
        console.print(table)
        if result.choices:
            console.print(_choices_table(result.choices))
        if low.get("unavailable"):
            err.print(f"charlm: no bf16 figure where a recurrent kernel is needed: {low['unavailable']}",
                      markup=False)
        if low:
            err.print(f"charlm: training's --precision auto picks {'bf16' if low['default'] else 'fp32'} here: "
                      f"{low['why']}", markup=False)


def _choices_table(choices: dict) -> Any:
    """What charlm picked for speed on this machine, and the timings it picked by (machine.py)."""
    table = _Table(title="chosen by measurement on this machine")
    for column in ("what", "for", "timings (ms)", "chosen"):
        table.add_column(column)
    for section, entries in sorted(choices.items()):
        for key, answer in sorted(entries.items()):
            if not isinstance(answer, dict):  # a probe's answer (a kernel runs, or why not)
                table.add_row(section, key, "", "runs" if answer is None else f"unavailable: {answer}")
                continue
            timings = ", ".join(f"{name.removesuffix('_ms')} {value:.3g}" for name, value in answer.items()
                                if name.endswith("_ms") and isinstance(value, (int, float)))
            table.add_row(section, key, timings, str(answer.get("chosen", "")))
    return table


# ── corpus ──────────────────────────────────────────────────────────────────────────────────────

corpus_app = typer.Typer(help="Download the standard corpora: tinyshakespeare, enwik8, text8, ptb, ptb-char, wikitext-2.",
                         no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")


class _DownloadDisplay:
    """Renders download progress: a rich bar on a terminal, a few plain lines otherwise."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None

    def __enter__(self) -> "_DownloadDisplay":
        if err.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), console=err, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _say(self, line: str) -> None:
        (self.progress.console if self.progress is not None else err).print(line, markup=False)

    def event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "file":
            self._say(f"charlm: downloading {event['file']} from {event['url']}")
            if self.progress is not None:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(event["file"], total=event["size"])
        elif kind == "resume":
            self._say(f"charlm: resuming at byte {event['offset']:,}")
        elif kind == "restart":
            self._say(f"charlm: warning: starting the file again: {event['reason']}")
        elif kind == "mirror_failed":
            self._say(f"charlm: warning: {event['url']} failed ({event['reason']}); trying the next mirror")
        elif kind == "unverified":
            self._say(f"charlm: warning: {event['file']} has no published checksum, so it could not be "
                      f"verified; its sha256 is {event['sha256']}")

    def update(self, done: int, total: int | None) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done, total=total)


@corpus_app.command("list")
def corpus_list(
    root: Annotated[Path, typer.Option(help="Folder the corpora are kept in.")] = Path("corpora"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """List the corpora charlm can download, their download size, and whether they are ready here.

    Example: charlm corpus list
    """
    with _handled():
        from charlm.data.corpora import list_corpora, prepared_corpus

        rows = []
        for spec in list_corpora():
            ready = prepared_corpus(spec, root)
            rows.append({"name": spec.name, "description": spec.description, "tokenizer": spec.tokenizer,
                         "download_bytes": spec.download_size, "splits": [s.split for s in spec.splits],
                         "prepared": ready is not None, "train": str(ready.train) if ready else None})
        if as_json:
            sys.stdout.write(jsonio.dumps({"root": str(root), "corpora": rows}) + "\n")
            return
        width = max(len(row["name"]) for row in rows)
        console.print(f"{'name':<{width}}  download  splits            tokenizer  ready", markup=False)
        for row in rows:
            size = f"{row['download_bytes'] / 1e6:.1f} MB" if row["download_bytes"] else "?"
            console.print(f"{row['name']:<{width}}  {size:>8}  {'/'.join(row['splits']):<16}  "
                          f"{row['tokenizer']:<9}  {'yes' if row['prepared'] else '-'}", markup=False)
            console.print(f"{'':<{width}}  {row['description']}", markup=False)


@corpus_app.command("get")
def corpus_get(
    name: Annotated[str, typer.Argument(help="A corpus name from 'charlm corpus list'.")],
    root: Annotated[Path, typer.Option(help="Folder the corpora are kept in.")] = Path("corpora"),
    mirror: Annotated[Optional[str], typer.Option(
        envvar="CHARLM_CORPUS_MIRROR",
        help="Fetch every file from MIRROR/NAME/FILE instead of the usual hosts (http://, https:// or file://).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download and split again even if the corpus is ready.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Download a standard corpus, verify its checksum, and write its train/valid/test files.

    Run it again after an interruption: the download resumes where it stopped.

    Example: charlm corpus get tinyshakespeare && charlm train tinyshakespeare
    """
    with _handled():
        from charlm.data.corpora import get_corpus

        with _DownloadDisplay() as display:
            result = get_corpus(name, root, base_url=mirror, progress=display.update, on_event=display.event,
                                force=force)
        report = {"name": result.name, "folder": str(result.folder), "downloaded": result.downloaded,
                  "splits": {split: str(path) for split, path in result.splits.items()},
                  "files": [{"name": f.name, "url": f.url, "sha256": f.sha256, "verified_by": f.verified_by}
                            for f in result.files]}
        if as_json:
            sys.stdout.write(jsonio.dumps(report) + "\n")
            return
        if not result.downloaded:
            err.print(f"charlm: {result.name} is already here (--force fetches it again)", markup=False)
        for split, path in result.splits.items():
            console.print(f"{split}: {path} ({path.stat().st_size:,} bytes)", markup=False)


# ── score ───────────────────────────────────────────────────────────────────────────────────────

@app.command()
def score(
    file: Annotated[Path, typer.Argument(help="UTF-8 text; each line is scored on its own ('-' reads standard input).")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    sort: Annotated[str, typer.Option(help="input (file order), best (most likely first) or worst.")] = "input",
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the first N lines after sorting.")] = None,
    include_end: Annotated[bool, typer.Option("--include-end/--no-include-end",
                                              help="Score each line's end (newline, or <EOS> for word models) too.")] = True,
    skip_empty: Annotated[bool, typer.Option("--skip-empty/--keep-empty", help="Leave out empty lines.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    encoding_errors: Annotated[str, typer.Option(help="strict, replace or ignore invalid UTF-8.")] = "strict",
) -> None:
    """Score each line of FILE alone: nats/token, perplexity and bits/char (lower = more like the training text).

    Every line starts from a fresh state after a newline (<EOS> for word models), as lines do in training.

    Example: charlm score candidates.txt --sort best --top 5
    """
    with _handled():
        from charlm.api import load
        from charlm.data.text import normalize_newlines, read_corpus

        if sort not in ("input", "best", "worst"):
            raise _usage(f"--sort must be input, best or worst (got {sort!r})")
        if str(file) == "-":
            text = normalize_newlines(sys.stdin.read())
        else:
            text = read_corpus(file, encoding_errors=encoding_errors)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip() or not skip_empty]
        if not numbered:
            raise _usage(f"{file}: has no lines to score")
        lm = load(checkpoint, device=device)
        scores = lm.score([line for _, line in numbered], include_end=include_end)
        rows = [{"line": n, **s.to_dict()} for (n, _), s in zip(numbered, scores)]
        if sort != "input":
            rows.sort(key=lambda r: (math.isnan(r["nats_per_token"]), r["nats_per_token"]), reverse=sort == "worst")
        rows = rows[:top] if top else rows
        if as_json:
            sys.stdout.write(jsonio.dumps({"file": str(file), "checkpoint": str(lm.path), "tokenizer": lm.tokenizer.kind,
                                         "include_end": include_end, "lines": rows}) + "\n")
            return
        table = _Table(box=None)
        for column in ("line", "perplexity", "nats/token", "bits/char", "tokens", "text"):
            table.add_column(column, justify="left" if column == "text" else "right")
        for row in rows:
            shown = row["text"] if len(row["text"]) <= 60 else row["text"][:59] + "…"
            table.add_row(str(row["line"]), f"{row['perplexity']:.3f}", f"{row['nats_per_token']:.4f}",
                          f"{row['bits_per_char']:.4f}", f"{row['tokens']:,}", Text(shown))
        console.print(table)
        if unknown := sum(r["unknown_tokens"] for r in rows):
            err.print(f"charlm: note: {unknown:,} tokens are not in the model's vocabulary (scored as <UNK>)",
                      markup=False)


# ── plot ────────────────────────────────────────────────────────────────────────────────────────

@app.command()
def plot(
    run: Annotated[Optional[Path], typer.Argument(help="A run folder. Default: the newest run under checkpoints/.")] = None,
    png: Annotated[Optional[Path], typer.Option(help='Also save the chart as a PNG (needs: pip install "charlm[plot]").')] = None,
    width: Annotated[int, typer.Option(min=10, max=1000, help="Chart width in characters.")] = 60,
    height: Annotated[int, typer.Option(min=3, max=500, help="Chart height in lines.")] = 12,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Show a run's training and validation loss against step, as a text chart (and optionally a PNG).

    Example: charlm plot checkpoints/tinyshakespeare --png loss.png
    """
    with _handled():
        from charlm.model.checkpoint import resolve_checkpoint
        from charlm.training.plot import read_metrics, save_png, terminal_chart

        run_dir = run if run is not None else resolve_checkpoint(None).parent
        metrics = read_metrics(run_dir)
        if as_json:
            sys.stdout.write(jsonio.dumps({"run": str(run_dir), "train_loss": metrics.train, "val_loss": metrics.val,
                                         "val_bpc": metrics.val_bpc, "best": metrics.best,
                                         "resumes": metrics.resumes, "finished": metrics.end is not None}) + "\n")
        else:
            sys.stdout.write(terminal_chart(metrics, width=width, height=height) + "\n")
            if (best := metrics.best) is not None:
                sys.stdout.write(f"best val loss {best[1]:.4f} nats/token at step {int(best[0]):,}\n")
        if metrics.skipped_lines:
            err.print(f"charlm: note: skipped {metrics.skipped_lines} unreadable line(s) of {metrics.path}",
                      markup=False)
        if png is not None:
            err.print(f"charlm: saved {save_png(run_dir, png)}", markup=False)


# ── export ──────────────────────────────────────────────────────────────────────────────────────

@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="The .onnx file to write; a .onnx.json description is written beside it.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Fix the batch size in the graph. Default: any batch size.")] = None,
    opset: Annotated[int, typer.Option(min=17, max=20, help="ONNX opset version (17 to 20, what torch's TorchScript exporter writes).")] = 17,
    check: Annotated[Optional[bool], typer.Option("--check/--no-check",
                                                  help="Run the graph next to the model and compare (needs onnxruntime). "
                                                       "Default: check when onnxruntime is installed.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Export a model to ONNX as one time step: token and hidden state in, logits and new state out.

    Example: charlm export model.onnx --checkpoint checkpoints/tinyshakespeare
    """
    with _handled():
        from charlm.model.checkpoint import load_checkpoint, resolve_checkpoint
        from charlm.errors import MissingDependencyError
        from charlm.model.export import check_onnx, export_onnx

        resolved = resolve_checkpoint(checkpoint)
        loaded = load_checkpoint(resolved)
        result = export_onnx(loaded.model, out, batch_size=batch_size, opset=opset, tokenizer=loaded.tokenizer)
        difference = None
        if check is not False:
            try:
                difference = check_onnx(loaded.model, result.path)
            except MissingDependencyError:
                if check:
                    raise
                err.print('charlm: note: onnxruntime is not installed, so the graph was not checked '
                          '(pip install "charlm[export]")', markup=False)
        report = {"checkpoint": str(resolved), "onnx": str(result.path), "description": str(result.sidecar),
                  "inputs": list(result.input_names), "outputs": list(result.output_names), "opset": result.opset,
                  "batch_size": result.batch_size, "max_abs_difference": difference}
        if as_json:
            sys.stdout.write(jsonio.dumps(report) + "\n")
            return
        console.print(f"wrote {result.path} (inputs {', '.join(result.input_names)}; outputs "
                      f"{', '.join(result.output_names)}; opset {result.opset})", markup=False)
        console.print(f"description: {result.sidecar}", markup=False)
        if difference is not None:
            console.print(f"checked with onnxruntime: largest difference {difference:.2g}", markup=False)


# ── serve ───────────────────────────────────────────────────────────────────────────────────────

@app.command()
def serve(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on. The default answers this machine only; 0.0.0.0 answers anyone who can reach it (then give --api-key, or --unauthenticated).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one (printed).")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "cpu",
    workers: Annotated[int, typer.Option(help="Requests the model runs at once; the rest wait their turn.")] = 2,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a worker; more are answered 503.")] = 64,
    batch: Annotated[int, typer.Option(help="0: each generation steps on its own, exactly as charlm sample does. N: up to N samples of concurrent requests step together, several times the throughput, but a rare draw can differ from charlm sample's with the same seed.")] = 0,
    max_length: Annotated[int, typer.Option(help="The most tokens one sample may ask for.")] = 5_000,
    max_samples: Annotated[int, typer.Option(help="The most samples one request may ask for.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="The most tokens in a prime, and in a text whose per-token log-probabilities are asked for.")] = 20_000,
    max_body_bytes: Annotated[int, typer.Option(help="The largest request body accepted.")] = 1_000_000,
    api_key: Annotated[Optional[str], typer.Option(envvar="CHARLM_API_KEY", show_envvar=True, help="Every /v1 request must send 'Authorization: Bearer KEY'. Default: no key (loopback only, unless --unauthenticated).")] = None,
    allow_host: Annotated[Optional[list[str]], typer.Option(help="A Host name to answer besides localhost, loopback and IP addresses (repeatable); other names are refused (DNS rebinding).")] = None,
    unauthenticated: Annotated[bool, typer.Option("--unauthenticated", help="Listen beyond loopback without --api-key: anyone who can reach the port can use the model.")] = False,
    max_connections: Annotated[int, typer.Option(help="Open connections at most; more are closed at once.")] = 256,
    client_timeout: Annotated[float, typer.Option(help="Seconds a client has to send its request's headers, and its body, and that a response may wait for a client that stopped reading.")] = 30.0,
) -> None:
    """Serve a model over HTTP: a JSON API (generate, score, perplexity; streaming as Server-Sent Events), OpenAI's completions API (/v1/completions, /v1/models) and a playground page that shows how surprised the model is by each character.

    Needs the serve extra: pip install "charlm[serve]". Open the printed address in a browser.

    Example: charlm serve checkpoints/tinyshakespeare --port 8000
    """
    with _handled():
        import socket

        from charlm.api import load
        from charlm.serve import ServeLimits, allowed_hosts_for, make_app, run

        limits = ServeLimits(max_body_bytes=max_body_bytes, max_length=max_length, max_samples=max_samples,
                             max_tokens=max_tokens, workers=workers, max_queue=max_queue, batch=batch,
                             max_connections=max_connections, client_timeout=client_timeout)
        try:
            family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise _usage(f"cannot listen on {host!r}: {exc.strerror}") from None
        allowed = allowed_hosts_for(host, str(address[0]), tuple(allow_host or ()))
        if allowed.ip_literals and api_key is None and not unauthenticated:
            raise _usage(f"--host {host} lets other machines use the model: give --api-key KEY (or CHARLM_API_KEY), "
                         f"or --unauthenticated to serve them without one")
        lm = load(checkpoint, device=device)
        say = lambda line: err.print(line, markup=False, highlight=False)  # noqa: E731
        app_ = make_app(lm, limits, allowed_hosts=allowed, api_key=api_key, log=say)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise _usage(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                         + (" (give another --port, or 0 for any free one)" if exc.errno == 98 else "")) from None
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        if allowed.ip_literals:
            who = "anyone with the API key" if api_key is not None else "anyone (there is no API key)"
            err.print(f"charlm: warning: listening on {host} port {bound}: {who} who can reach this machine can "
                      f"generate and score text with the model and read its configuration (/v1/model); Host names "
                      f"answered: {allowed.describe()}", markup=False)

        def started() -> None:
            err.print(f"charlm: serving {lm.path} at http://{shown}:{bound}/ (API under /v1; Ctrl-C stops)",
                      markup=False)

        try:
            run(app_, sock, on_started=started, log=say)
        except KeyboardInterrupt:  # uvicorn shuts down first, then passes Ctrl-C on: the way to stop
            pass
        err.print("charlm: server stopped", markup=False)


def main() -> None:
    """The ``charlm`` command: Typer parses; a parse error is one line, like every other error."""
    try:  # Typer ≥ 0.26 carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    if sys.stdout is None:  # started with stdout closed (>&-): every command's result would be lost
        err.print("charlm: error: standard output is closed; redirect it to a file or /dev/null instead",
                  markup=False)
        sys.exit(1)
    sys.stdout = _GuardedStdout(sys.stdout)  # type: ignore[assignment]
    try:
        code = app(standalone_mode=False)
        _flush_stdout()
    except click_errors.NoArgsIsHelpError as exc:  # a group with no command: its help, exit 2 as before
        app(args=[*sys.argv[1:], "--help"], standalone_mode=False)
        code = exc.exit_code
    except click_errors.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"charlm: error: {exc.format_message()}{hint}", markup=False)
        code = exc.exit_code
    except click_errors.Abort:
        err.print("charlm: interrupted", markup=False)
        code = 130
    except OutputLost as exc:
        err.print(f"charlm: error: {exc}", markup=False)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
