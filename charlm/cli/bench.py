"""The ``charlm bench`` command: charlm's speed on this machine, and what it chose by measuring."""
from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from charlm import jsonio
from charlm.cli.output import SafeTable, console, err, handled
from charlm.config import CELLS
from charlm.errors import ConfigError


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
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.bench import BenchConfig, run_bench

        if cell not in CELLS:
            raise ConfigError(f"--cell must be one of {', '.join(CELLS)} (got {cell!r})")
        cfg = BenchConfig(cell=cell, hidden_size=hidden_size, num_layers=num_layers, embed_size=embed_size,
                          vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, train_steps=steps,
                          sample_streams=sample_streams, repeats=repeats, device=device, bf16=bf16)
        result = run_bench(cfg, on_progress=lambda what: err.print(f"charlm: measuring {what}…", markup=False))
        if as_json:
            console.print_json(jsonio.dumps(result.to_dict()))
            return
        table = SafeTable(title=f"charlm bench · {num_layers}×{hidden_size} {cell.upper()} · {result.device}")
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
    table = SafeTable(title="chosen by measurement on this machine")
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
