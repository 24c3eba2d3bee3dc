"""The ``charlm`` command line: parse options → build configs → call the library → render.

The only module that prints, exits, or knows about terminals. Heavy imports (torch) happen inside
the commands so ``charlm --help`` stays fast.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import CharlmError

app = typer.Typer(
    name="charlm",
    help="Train recurrent language models (LSTM, GRU, RNN) on a text file, sample from them, and score text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False, soft_wrap=True)

DEFAULT_MINUTES = 3.0


def _error(message: str, code: int) -> typer.Exit:
    err.print(f"charlm: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _handled() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code; never a traceback."""
    try:
        yield
    except CharlmError as exc:
        raise _error(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("charlm: interrupted", markup=False)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # `charlm sample | head`: the reader went away; that is not an error.
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        raise typer.Exit(0) from None
    except MemoryError:
        raise _error("out of memory; try a smaller --batch-size or --hidden-size", 1) from None


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

    def __init__(self, *, live: bool, budget_seconds: float | None) -> None:
        self.live = live and err.is_terminal
        self.budget = budget_seconds
        self.progress = None
        self.task = None
        self.total_steps: int | None = None
        self.best: dict[str, Any] | None = None
        self.last_val: float | None = None
        self.step_info = ""

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

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self.total_steps = event["total_steps"]
            cfg = event["model_config"]
            err.print(f"charlm: {cfg['num_layers']}×{cfg['hidden_size']} {cfg['cell'].upper()}, "
                      f"{event['num_parameters']:,} parameters, {event['train_tokens']:,} training / "
                      f"{event['val_tokens']:,} validation tokens, device {event['device']}"
                      + (" (resumed)" if event["resumed"] else ""), markup=False)
        elif kind == "warning":
            err.print(f"charlm: warning: {event['message']}", markup=False)
        elif kind == "step":
            val = f" · val {self.last_val:.4f}" if self.last_val is not None else ""
            self.step_info = (f"step {event['step']:,} · loss {event['loss']:.4f}{val} · "
                              f"{event['tokens_per_second'] / 1000:.1f}k tok/s")
            self._update(event)
        elif kind == "eval":
            self.last_val = event["val_loss"]
            if event["improved"]:
                self.best = event
            line = (f"step {event['step']:,}: val loss {event['val_loss']:.4f} nats/token, "
                    f"{event['val_bpc']:.4f} bits/char" + (" (best)" if event["improved"] else ""))
            if self.progress is not None:
                self.progress.console.print(line, markup=False)
            else:
                err.print(line, markup=False)
            self._update(event)
        elif kind == "bad_step":
            err.print(f"charlm: warning: non-finite loss at step {event['step']}, step skipped", markup=False)

    def _update(self, event: dict[str, Any]) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=1000 * self._fraction(event), description=self.step_info)


class _StopFlag:
    """SIGINT/SIGTERM ask the trainer to stop after the current step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        err.print(f"\ncharlm: {self.reason}: finishing this step and saving…", markup=False)

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
def train(
    corpus: Annotated[Optional[str], typer.Argument(
        help="UTF-8 text file to train on. Default: Python's built-in documentation text (offline).")] = None,
    tokenizer: Annotated[str, typer.Option(help="char, word or byte.")] = "char",
    cell: Annotated[str, typer.Option(help="lstm, gru or rnn (tanh).")] = "lstm",
    hidden_size: Annotated[Optional[int], typer.Option(help="Hidden units per layer. Default: sized to the corpus and budget.")] = None,
    num_layers: Annotated[Optional[int], typer.Option(help="Recurrent layers. Default: 2.")] = None,
    embed_size: Annotated[Optional[int], typer.Option(help="Embedding width. Default: min(hidden, 128); hidden when tied.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout between layers. Default: from the expected number of epochs.")] = None,
    tie_weights: Annotated[Optional[bool], typer.Option("--tie-weights/--no-tie-weights", help="Share embedding and output weights. Default: on for word models.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="BPTT window length. Default: 100 (35 for words).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams. Default: 16.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate. Default: by model size.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (weights only).")] = 0.01,
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping threshold (0 = off).")] = 1.0,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps before the cosine decay.")] = 100,
    min_lr_ratio: Annotated[float, typer.Option(help="The cosine decay ends at this fraction of --lr.")] = 0.1,
    epochs: Annotated[Optional[int], typer.Option(help="Stop after this many passes over the data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help=f"Time budget, evaluation included. Default: {DEFAULT_MINUTES:g} when no --epochs/--max-steps.")] = None,
    val_fraction: Annotated[float, typer.Option(help="The LAST fraction of the corpus kept for validation.")] = 0.1,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps. Default: 4 times per time budget, 10 per step/epoch limit.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after N evaluations without improvement.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1337,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Run folder. Default: checkpoints/<corpus name>/ (a new -N folder if taken).")] = None,
    min_count: Annotated[int, typer.Option(help="Word models: keep words seen at least this often.")] = 1,
    max_vocab: Annotated[Optional[int], typer.Option(help="Word models: keep at most this many words.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder exactly where it stopped.")] = None,
    encoding_errors: Annotated[str, typer.Option(help="strict, replace or ignore invalid UTF-8.")] = "strict",
    max_bad_steps: Annotated[int, typer.Option(help="Stop after this many NaN/Inf steps in a row.")] = 25,
    sample_length: Annotated[int, typer.Option(help="Length of the sample printed at the end (0 = none).")] = 300,
    log_every: Annotated[Optional[int], typer.Option(help="Write the mean training loss to metrics.jsonl every N steps. Default: 10.")] = None,
) -> None:
    """Train a model on CORPUS and keep the best and last checkpoints.

    Example: charlm train tinyshakespeare.txt --max-minutes 10
    """
    with _handled():
        from .checkpoint import BEST
        from .config import TOKENIZERS, ModelConfig, TrainConfig, auto_size
        from .distributed import from_env, shutdown
        from .errors import ConfigError
        from .model import resolve_device
        from .train import load_resume, new_run_dir, prepare_corpus, resume_configs, train as run_training

        if tokenizer not in TOKENIZERS:
            raise ConfigError(f"--tokenizer must be one of {', '.join(TOKENIZERS)} (got {tokenizer!r})")
        dist = from_env(device)
        note = (lambda message: err.print(f"charlm: {message}", markup=False)) if dist.is_main else None
        try:
            if resume is not None:
                res = load_resume(resume)
                overrides = dict(cell=None if cell == "lstm" else cell, hidden_size=hidden_size, num_layers=num_layers,
                                 embed_size=embed_size, tie_weights=tie_weights, dropout=dropout, batch_size=batch_size,
                                 seq_len=seq_len, epochs=epochs, max_steps=max_steps, max_minutes=max_minutes,
                                 patience=patience, device=None if device == "auto" else device, eval_every=eval_every,
                                 log_every=log_every, tokenizer=None if tokenizer == "char" else tokenizer)
                model_cfg, train_cfg = resume_configs(res, overrides)
                source = corpus or res.checkpoint.train_state.get("corpus") or None
                # Rank 0 tokenizes (and fills the token cache) first; the others then read the cache.
                for turn in (True, False):
                    if dist.is_main == turn:
                        corpus_data, data = prepare_corpus(source, val_fraction=train_cfg.val_fraction,
                                                           tokenizer=res.checkpoint.tokenizer,
                                                           encoding_errors=encoding_errors, on_note=note)
                    dist.barrier()
                run_dir = res.run_dir
            else:
                res = None
                if epochs is None and max_steps is None and max_minutes is None:
                    max_minutes = DEFAULT_MINUTES
                for turn in (True, False):
                    if dist.is_main == turn:
                        corpus_data, data = prepare_corpus(corpus, kind=tokenizer, val_fraction=val_fraction,
                                                           min_count=min_count, max_vocab=max_vocab,
                                                           encoding_errors=encoding_errors, on_note=note)
                    dist.barrier()
                if dist.broadcast_object(data.tokenizer.to_dict()) != data.tokenizer.to_dict():
                    raise ConfigError("the processes of the distributed run built different vocabularies")
                gpu = resolve_device(device).type == "cuda"
                auto = auto_size(tokenizer=tokenizer, train_tokens=len(data.train_ids), max_minutes=max_minutes,
                                 gpu=gpu)
                hidden = hidden_size or auto.hidden_size
                tie = tie_weights if tie_weights is not None else (auto.tie_weights and embed_size in (None, hidden))
                model_cfg = ModelConfig(
                    vocab_size=data.tokenizer.vocab_size, cell=cell, hidden_size=hidden,
                    num_layers=num_layers or auto.num_layers, dropout=auto.dropout if dropout is None else dropout,
                    embed_size=embed_size or (hidden if tie else min(hidden, auto.embed_size)), tie_weights=tie)
                train_cfg = TrainConfig(
                    seq_len=seq_len or auto.seq_len, batch_size=batch_size or auto.batch_size, lr=lr or auto.lr,
                    weight_decay=weight_decay, clip=clip, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                    epochs=epochs, max_steps=max_steps, max_minutes=max_minutes, val_fraction=val_fraction,
                    eval_every=eval_every, patience=patience, seed=seed, device=device, max_bad_steps=max_bad_steps,
                    log_every=log_every or 10)
                if out is not None:
                    if dist.is_main and out.exists() and any(out.glob("*.safetensors")):
                        raise ConfigError(f"{out} already holds a run; pass --resume {out} to continue it "
                                          f"or choose another --out")
                    run_dir = out
                else:
                    run_dir = Path(dist.broadcast_object(str(new_run_dir("checkpoints", corpus_data.name))))
                if note and (unknown := data.tokenizer.count_unknown(data.val_ids)):
                    note(f"note: {unknown:,} validation tokens are not in the training vocabulary (scored as <UNK>)")
            budget_seconds = train_cfg.max_minutes * 60 if train_cfg.max_minutes else None
            display = _TrainDisplay(live=dist.is_main, budget_seconds=budget_seconds)
            with _StopFlag() as stop, display:
                result = run_training(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=run_dir,
                                      source=corpus_data.source, on_event=display, should_stop=stop, resume=res,
                                      dist=dist)
        finally:
            shutdown(dist)
        if result.stopped_by == "interrupt":
            if dist.is_main:
                err.print(f"charlm: stopped at step {result.step:,}; saved {run_dir / 'last.safetensors'}. "
                          f"Resume with: charlm train --resume {run_dir}", markup=False)
            raise typer.Exit(143 if stop.reason == "SIGTERM" else 130)
        if not dist.is_main:
            return
        best = display.best
        if best is None or not math.isfinite(result.best_val_loss):
            raise ConfigError("training ended before any evaluation")
        console.print(f"best val loss {best['val_loss']:.4f} nats/token · {best['val_bpc']:.4f} bits/char · "
                      f"perplexity {math.exp(best['val_loss']):.3f} (step {best['step']:,} of {result.step:,}, "
                      f"{result.elapsed_seconds:.0f} s, stopped: {result.stopped_by})", markup=False)
        console.print(f"checkpoints: {run_dir / BEST}", markup=False)
        if sample_length > 0:
            console.print("sample:", markup=False)
            _stream_sample(run_dir / BEST, length=sample_length, temperature=0.8, seed=seed)


def _stream_sample(path: Path, *, length: int, temperature: float, seed: int) -> None:
    from .checkpoint import load_checkpoint
    from .config import SampleConfig
    from .sample import generate

    checkpoint = load_checkpoint(path)
    config = SampleConfig(temperature=temperature, length=length, seed=seed)
    for piece in generate(checkpoint.model, checkpoint.tokenizer, config=config):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


# ── sample ──────────────────────────────────────────────────────────────────────────────────────

@app.command()
def sample(
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
) -> None:
    """Generate text from a trained model, streamed to stdout as it is produced.

    Example: charlm sample --prime "ROMEO:" --temperature 0.7 --length 300 --seed 1
    """
    with _handled():
        from .checkpoint import load_checkpoint, resolve_checkpoint
        from .config import SampleConfig
        from .data import read_corpus
        from .model import resolve_device
        from .sample import generate

        config = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, length=length,
                              num_samples=num_samples, seed=seed, stop=stop)
        if prime_file is not None:
            if prime:
                raise _usage("give --prime or --prime-file, not both")
            prime = read_corpus(prime_file)
        loaded = load_checkpoint(resolve_checkpoint(checkpoint), device=str(resolve_device(device)))
        if loaded.tokenizer.kind == "word" and (unknown := loaded.tokenizer.unknown_symbols(prime)):
            err.print(f"charlm: warning: {len(unknown)} prime word(s) not in the vocabulary, read as <UNK>: "
                      f"{' '.join(unknown[:8])}", markup=False)
        separate = num_samples > 1
        buffers: list[list[str]] = [[] for _ in range(num_samples)]
        if separate:
            sys.stdout.write("──── sample 1 ────\n")
        sys.stdout.write(prime)
        sys.stdout.flush()
        # The first sample streams live; the others are printed whole once generated.
        for piece in generate(loaded.model, loaded.tokenizer, config=config, prime=prime):
            if piece.stream == 0:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
            else:
                buffers[piece.stream].append(piece.text)
        sys.stdout.write("\n")
        for i in range(1, num_samples):
            sys.stdout.write(f"──── sample {i + 1} ────\n{prime}{''.join(buffers[i])}\n")
        sys.stdout.flush()


def _usage(message: str) -> CharlmError:
    from .errors import UsageError

    return UsageError(message)


# ── perplexity ──────────────────────────────────────────────────────────────────────────────────

@app.command()
def perplexity(
    file: Annotated[Path, typer.Argument(help="Held-out UTF-8 text to score.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    encoding_errors: Annotated[str, typer.Option(help="strict, replace or ignore invalid UTF-8.")] = "strict",
) -> None:
    """Score held-out text: nats/token, bits/char (comparable across tokenizers) and perplexity.

    Example: charlm perplexity heldout.txt --checkpoint checkpoints/tinyshakespeare
    """
    with _handled():
        from .checkpoint import load_checkpoint, resolve_checkpoint
        from .data import read_corpus
        from .evaluate import evaluate
        from .model import resolve_device

        text = read_corpus(file, encoding_errors=encoding_errors)
        resolved = resolve_checkpoint(checkpoint)
        dev = resolve_device(device)
        loaded = load_checkpoint(resolved, device=str(dev))
        ids = loaded.tokenizer.encode(text)
        if len(ids) < 2:
            raise _usage(f"{file}: needs at least 2 tokens to score (has {len(ids)})")
        t0 = time.perf_counter()
        result = evaluate(loaded.model, ids, autocast=dev.type == "cuda")
        seconds = time.perf_counter() - t0
        report = {
            "file": str(file), "checkpoint": str(resolved), "tokenizer": loaded.tokenizer.kind,
            "tokens": int(len(ids)), "predicted_tokens": result.num_predicted, "characters": len(text),
            "unknown_tokens": loaded.tokenizer.count_unknown(ids), "total_nats": result.total_nats,
            "nats_per_token": result.nats_per_token, "bits_per_char": result.bits_per_char(len(text)),
            "perplexity": result.perplexity, "seconds": seconds,
        }
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
            return
        table = Table(show_header=False, box=None)
        for label, value in (("tokens", f"{report['tokens']:,}"), ("characters", f"{report['characters']:,}"),
                             ("<UNK> tokens", f"{report['unknown_tokens']:,}"),
                             ("nats/token", f"{report['nats_per_token']:.4f}"),
                             ("bits/char", f"{report['bits_per_char']:.4f}"),
                             ("perplexity", f"{report['perplexity']:.3f}")):
            table.add_row(label, value)
        console.print(table)
        if report["unknown_tokens"]:
            unknown = loaded.tokenizer.unknown_symbols(text)
            err.print(f"charlm: note: {report['unknown_tokens']:,} tokens are not in the model's vocabulary "
                      f"(scored as <UNK>): {' '.join(repr(u) for u in unknown[:8])}", markup=False)


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
        from .checkpoint import load_checkpoint, resolve_checkpoint

        resolved = resolve_checkpoint(checkpoint)
        loaded = load_checkpoint(resolved)
        report = {
            "checkpoint": str(resolved), "format": loaded.metadata.get("format"),
            "parameters": loaded.model.num_parameters(), "tokenizer": loaded.tokenizer.kind,
            "vocab_size": loaded.tokenizer.vocab_size, "model_config": loaded.model_config.to_dict(),
            "train_config": loaded.train_config.to_dict() if loaded.train_config else None,
            "train_state": loaded.train_state,
        }
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
            return
        table = Table(show_header=False, box=None)
        table.add_row("checkpoint", str(resolved))
        table.add_row("model", f"{loaded.model_config.num_layers}×{loaded.model_config.hidden_size} "
                               f"{loaded.model_config.cell.upper()}, embedding {loaded.model_config.embed_size}, "
                               f"dropout {loaded.model_config.dropout:g}"
                               + (", tied weights" if loaded.model_config.tie_weights else ""))
        table.add_row("parameters", f"{report['parameters']:,}")
        table.add_row("tokenizer", f"{loaded.tokenizer.kind}, {loaded.tokenizer.vocab_size:,} tokens")
        state = loaded.train_state
        if state:
            table.add_row("trained", f"step {state.get('step', '?'):,} (epoch {state.get('epoch', '?')}), "
                                     f"{state.get('tokens_seen', 0):,} tokens, {state.get('elapsed_seconds', 0):.0f} s")
            best = state.get("best_val_loss")
            if isinstance(best, (int, float)) and math.isfinite(best):
                table.add_row("best val loss", f"{best:.4f} nats/token at step {state.get('best_step', '?'):,}")
            table.add_row("corpus", str(state.get("corpus", "?")))
        if loaded.train_config:
            cfg = loaded.train_config
            table.add_row("training", f"batch {cfg.batch_size} × seq {cfg.seq_len}, lr {cfg.lr:g}, "
                                      f"weight decay {cfg.weight_decay:g}, clip {cfg.clip:g}, seed {cfg.seed}")
        console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
