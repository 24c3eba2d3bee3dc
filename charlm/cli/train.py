"""The ``charlm train`` command: what the user typed goes to ``charlm.api.train``; its events are
rendered live, and SIGINT/SIGTERM become a graceful stop."""
from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from charlm import jsonio
from charlm.cli.options import with_declared_options
from charlm.cli.output import Signalled, console, err, handled, usage_error, write_text
from charlm.config import check_option
from charlm.errors import CharlmError


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
            raise Signalled(signal.Signals(signum).name)
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


@with_declared_options  # every option of training/options.py, then the command line's own below
def train(
    ctx: typer.Context,
    *,
    sample_length: Annotated[int, typer.Option(help="Length of the sample printed at the end (0 = none).",
                                               rich_help_panel="Output")] = 300,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result (and sample) instead.",
                                          rich_help_panel="Output")] = False,
    **declared: Any,
) -> None:
    """Train a model on CORPUS and keep the best and last checkpoints.

    Example: charlm train tinyshakespeare.txt --max-minutes 10
    """
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.api import train as run_training
        from charlm.training.distributed import placement_from_env

        check_option("sample_length", sample_length)  # the CLI's own option; the library checks the rest

        # The library plans the run (plan.plan_run); the CLI passes what was typed and renders.
        # Only what was typed: the defaults are the declaration's, and a resumed run refuses or honours
        # exactly the options given.
        corpus, seed = declared["corpus"], declared["seed"]
        options = {name: (str(value) if isinstance(value, Path) else value) for name, value in declared.items()
                   if name != "corpus" and _given(ctx, name)}
        main_process = placement_from_env().is_main
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
            raise usage_error("training ended before any evaluation")
        # A stop request after training (during the cache pointer fit) skipped the fit; the run is
        # complete, and its result is printed, but no sample is drawn and SIGTERM still ends with 143.
        if stop.reason is not None:
            sample_length = 0
        # The run's best, which after --resume may come from before it: not this session's last improvement.
        if as_json:
            sample_text = ("".join(_end_of_training_sample(result.best_checkpoint, length=sample_length, seed=seed))
                           if sample_length > 0 else None)
            sys.stdout.write(jsonio.dumps({
                "run": str(run_dir), "checkpoint": str(result.best_checkpoint), "best_val_loss": result.best_val_loss,
                "best_val_bpc": result.best_val_bpc, "best_val_perplexity": math.exp(min(result.best_val_loss, 700)),
                "best_step": result.best_step, "steps": result.step, "elapsed_seconds": result.elapsed_seconds,
                "stopped_by": result.stopped_by, "num_parameters": result.num_parameters,
                "eval_seconds": result.eval_seconds, "cache_seconds": result.cache_seconds,
                "cache": result.cache.to_dict() if result.cache is not None else None,
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
            for text in _end_of_training_sample(result.best_checkpoint, length=sample_length, seed=seed):
                write_text(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        if stop.reason == "SIGTERM":
            raise typer.Exit(143)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line), as opposed to its default."""
    source = ctx.get_parameter_source(name)  # click's ParameterSource (Typer may vendor click)
    return getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def _print_loss_chart(run_dir: Path) -> None:
    """The run's loss curves as plain text on stderr (no extra dependency, no colour codes)."""
    from charlm.api import loss_curves  # lazy, as in the command

    try:
        curves = loss_curves(run_dir)
    except CharlmError:
        return
    if len(curves.metrics.train) >= 2:
        err.print(curves.chart(width=60, height=10), markup=False, highlight=False)


def _end_of_training_sample(path: Path, *, length: int, seed: int) -> Iterator[str]:
    """The pieces of the short sample ``train`` ends with (temperature 0.8, the run's seed)."""
    from charlm.api import load  # lazy, as in the command

    yield from load(path).generate(length=length, temperature=0.8, seed=seed)

