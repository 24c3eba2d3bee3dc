"""The ``charlm train`` command: what the user typed goes to ``charlm.api.train``; its events are
rendered live, and SIGINT/SIGTERM become a graceful stop."""
from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from charlm import jsonio
from charlm.cli.output import Signalled, console, err, handled, usage_error, write_text
from charlm.config import TrainConfig, check_option
from charlm.errors import CharlmError
from charlm.training.plan import DEFAULT_LOG_EVERY, DEFAULT_MINUTES

_TRAIN = TrainConfig()  # the configs' defaults, stated once


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


def train(
    ctx: typer.Context,
    corpus: Annotated[Optional[str], typer.Argument(
        help="UTF-8 text file to train on, a folder of them (read recursively; see --include), or a corpus name from 'charlm corpus list' (after 'charlm corpus get NAME'). "
             "Default: Python's built-in documentation text (offline).")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="A folder corpus: read only files whose names match this pattern (e.g. '*.c'; repeat for more). Default: every file but hidden ones. Binary and non-UTF-8 files are skipped and counted.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="A folder corpus: leave out files and folders whose names match this pattern (e.g. 'site-packages', 'test_*'; repeat for more).")] = None,
    tokenizer: Annotated[str, typer.Option(help="char, word or byte.")] = "char",
    cell: Annotated[str, typer.Option(help="lstm, gru, rnn (tanh) or peephole (an LSTM whose gates also see the cell state; docs/cells.md).")] = "lstm",
    optimizer: Annotated[Optional[str], typer.Option(help="adamw, sgd (plain, as the PyTorch word-LM example: --lr 20 for words, --clip 0.25), adagrad or rmsprop (decay 0.95, as char-rnn). All use the warm-up + cosine schedule; the non-AdamW ones default to no weight decay. Default: sgd for word models, adamw otherwise (measured: docs/word-models.md).")] = None,
    hidden_size: Annotated[Optional[int], typer.Option(help="Hidden units per layer. Default: sized to the corpus and budget.")] = None,
    num_layers: Annotated[Optional[int], typer.Option(help="Recurrent layers. Default: 1 on a CPU (one wide layer learns fastest per CPU-second), 3 on a GPU.")] = None,
    embed_size: Annotated[Optional[int], typer.Option(help="Embedding width. Default: min(hidden, 128) on a CPU, min(hidden, 256) on a GPU; hidden when tied.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Variational dropout (one mask per stream and window) between layers and on the last layer's output, and on the embeddings unless --input-dropout (half as much for char and byte models). Default: from the expected number of epochs.")] = None,
    input_dropout: Annotated[Optional[float], typer.Option(help="Variational dropout on the embedding output (one mask per stream and window). Default: half of --dropout for char and byte models, as auto-sized for word models.")] = None,
    embed_dropout: Annotated[Optional[float], typer.Option(help="Drop whole tokens: every use of a dropped token's embedding in a batch (AWD-LSTM). Default: by expected epochs (0 for char models).")] = None,
    weight_drop: Annotated[Optional[float], typer.Option(help="DropConnect on the hidden-to-hidden weights, a new mask each window; the fused kernel still runs. Default: by expected epochs.")] = None,
    activation_reg: Annotated[Optional[float], typer.Option(help="AR: add this × the mean square of the last layer's outputs to the loss. Default: 0.")] = None,
    temporal_reg: Annotated[Optional[float], typer.Option(help="TAR: add this × the mean square of their change from step to step. Default: 0.")] = None,
    tie_weights: Annotated[Optional[bool], typer.Option("--tie-weights/--no-tie-weights", help="Share embedding and output weights. Default: on for word models.")] = None,
    residual: Annotated[Optional[bool], typer.Option("--residual/--no-residual", help="Skip connections between stacked layers: each layer after the first adds its input to its output (needs --num-layers ≥ 2). Default: off.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="BPTT window length. Default: 100 (35 for words, 256 on a GPU).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams. Default on a CPU: 16 up to 512 hidden units, 32 above (32 for words); 64 on a GPU.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate. Default: by model size.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (weights only).")] = _TRAIN.weight_decay,
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping threshold (0 = off).")] = _TRAIN.clip,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps before the cosine decay (at most a tenth of a step/epoch limit).")] = _TRAIN.warmup_steps,
    min_lr_ratio: Annotated[Optional[float], typer.Option(help="The cosine decay ends at this fraction of --lr. Default: 0; with --average, as sized for the tokenizer (1, a constant rate, for word models).")] = None,
    average: Annotated[Optional[bool], typer.Option("--average/--no-average", help="Evaluate and save the average of the run's weights (step t weighs t^P, P = --average-power), not the last step's: a high learning rate then still ends at a quiet point (AWD-LSTM's averaged SGD). Default: on for word models whose budget buys 8 or more epochs, with a constant rate.")] = None,
    average_power: Annotated[Optional[float], typer.Option(help="How much --average leans on recent steps: 0 weighs the whole run equally; with P the mean age of what is averaged is 1/(P+2) of the run (0–20; giving it turns --average on). Default: 2.")] = None,
    shift_windows: Annotated[Optional[bool], typer.Option("--shift-windows/--no-shift-windows", help="Start each epoch's BPTT windows at a different offset (0 to --seq-len − 1, drawn from the seed and the epoch), so a token is not always at the same place in its window (AWD-LSTM varies the length for this). Default: on where the budget buys 8 or more epochs of a word model, 3 or more of a char or byte model.")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="When the run ends, fit a cache pointer (Grave et al. 2017) to the best checkpoint on the validation split: the model's next-token distribution mixed with the tokens that followed similar moments of the recent past. It is stored in the checkpoint, kept only where it lowers the validation loss by 0.01 nats/token or more, and used by 'charlm perplexity' unless --no-cache. Its time is bounded and counted: at most a tenth of --max-minutes (kept inside it), or of the training time (at least 2 s) for --epochs/--max-steps runs; Ctrl-C skips it and keeps the checkpoints.")] = True,
    epochs: Annotated[Optional[int], typer.Option(help="Stop after this many passes over the data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help=f"Time budget, the final evaluation and the cache pointer fit included (with --resume: the whole run's, time already spent included). Default: {DEFAULT_MINUTES:g} when no --epochs/--max-steps.")] = None,
    val_fraction: Annotated[float, typer.Option(help="The LAST fraction of the corpus kept for validation.")] = _TRAIN.val_fraction,
    val_file: Annotated[Optional[Path], typer.Option(help="Validate on this file instead; all of CORPUS is then training text.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps. Default: under a time budget every twentieth of it, but at most ~3% of the time spent evaluating; 10 times per step/epoch limit; always at the end.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after N evaluations without improvement.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _TRAIN.seed,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = _TRAIN.device,
    tf32: Annotated[bool, typer.Option("--tf32/--no-tf32", help="On a CUDA GPU, let float32 matmuls and cuDNN's recurrences use TF32 tensor cores (10-bit mantissa products, float32 sums); --no-tf32 keeps exact float32. No effect on a CPU. Adjustable on --resume.")] = True,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16: the matmuls' number format in training (validation is fp32). auto: bf16 on a GPU with bf16 and on a CPU with native bf16 (AVX-512 BF16 or AMX), fp32 elsewhere; the start line says which and why. fp16 (CUDA only) trains with a loss scaler. Kept by --resume unless given.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Run folder. Default: checkpoints/<corpus name>/ (a new -N folder if taken).")] = None,
    min_count: Annotated[Optional[int], typer.Option(help="Keep words (or characters) seen at least this often; the rest are <UNK>. Default: 2 for words (so <UNK> is trained), 1 otherwise.")] = None,
    max_vocab: Annotated[Optional[int], typer.Option(help="Keep at most this many tokens, the most frequent (<UNK> included).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder exactly where it stopped.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Fine-tune: start a new run from this checkpoint or run folder: its shape and vocabulary (fixed), its dropout, --seq-len, --batch-size and --lr unless given; a fresh optimizer and schedule. Unseen tokens become <UNK>.")] = None,
    extend_vocab: Annotated[bool, typer.Option("--extend-vocab", help="With --init-from: add the new text's unseen tokens to the vocabulary (new embedding and output rows; the old rows unchanged).")] = False,
    encoding_errors: Annotated[str, typer.Option(help="strict, replace or ignore invalid UTF-8.")] = "strict",
    max_bad_steps: Annotated[int, typer.Option(help="Stop after this many NaN/Inf steps in a row.")] = _TRAIN.max_bad_steps,
    sample_length: Annotated[int, typer.Option(help="Length of the sample printed at the end (0 = none).")] = 300,
    log_every: Annotated[Optional[int], typer.Option(help=f"Write the mean training loss to metrics.jsonl every N steps. Default: {DEFAULT_LOG_EVERY}.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result (and sample) instead.")] = False,
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
        options = {name: (str(value) if isinstance(value, Path) else value) for name, value in ctx.params.items()
                   if name not in ("corpus", "sample_length", "as_json")}
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
                                  given_options={name for name in ctx.params if _given(ctx, name)}, **options)
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
            for text in _end_of_training_sample(result.best_checkpoint, length=sample_length, seed=seed):
                write_text(text)
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

