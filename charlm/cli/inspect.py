"""The commands that read what training made and report or convert it: ``info``, ``plot`` and ``export``."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from charlm import jsonio
from charlm.cli.output import SafeTable, console, err, handled


def info(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Show what a checkpoint holds: configs, vocabulary, parameters and training state.

    Example: charlm info checkpoints/tinyshakespeare
    """
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.api import info as checkpoint_info

        report = checkpoint_info(checkpoint)
        if as_json:
            sys.stdout.write(jsonio.dumps(report) + "\n")
            return
        console.print(_info_table(report))


def _info_table(report: dict[str, Any]) -> SafeTable:
    """``charlm info``'s table, from the report ``charlm.api.info`` gives."""
    table = SafeTable(show_header=False, box=None)
    table.add_row("checkpoint", report["checkpoint"])
    mc = report["model_config"]
    table.add_row("model", f"{mc['num_layers']}×{mc['hidden_size']} {mc['cell'].upper()}, embedding {mc['embed_size']}"
                           + (", tied weights" if mc["tie_weights"] else "")
                           + (", residual connections" if mc["residual"] else ""))
    table.add_row("regularisation", ", ".join(
        [f"dropout {mc['dropout']:g}"]
        + ([f"input dropout {mc['input_dropout']:g}"] if mc["input_dropout"] is not None else [])
        + [f"{name} {value:g}" for name, value in (("embedding dropout", mc["embed_dropout"]),
                                                   ("weight drop", mc["weight_drop"])) if value]))
    table.add_row("parameters", f"{report['parameters']:,}")
    table.add_row("tokenizer", f"{report['tokenizer']}, {report['vocab_size']:,} tokens")
    state = report["train_state"]
    if state:
        table.add_row("trained", f"step {_count(state.get('step'))} (epoch {_count(state.get('epoch'))}), "
                                 f"{_count(state.get('tokens_seen'))} tokens, "
                                 f"{_seconds(state.get('elapsed_seconds'))}")
        best = state.get("best_val_loss")
        if isinstance(best, (int, float)) and math.isfinite(best):
            table.add_row("best val loss", f"{best:.4f} nats/token at step {_count(state.get('best_step'))}")
        table.add_row("corpus", str(state.get("corpus") or "?"))
    if cfg := report["train_config"]:
        table.add_row("training", f"{cfg['optimizer']}, batch {cfg['batch_size']} × seq {cfg['seq_len']}, "
                                  f"lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, clip {cfg['clip']:g}, "
                                  f"seed {cfg['seed']}, {cfg['precision']}"
                                  + "".join(f", {name} {value:g}" for name, value in
                                            (("AR", cfg["activation_reg"]), ("TAR", cfg["temporal_reg"])) if value)
                                  + (f", averaged weights (power {cfg['average_power']:g})" if cfg["average"] else "")
                                  + (", windows shifted each epoch" if cfg["shift_windows"] else ""))
    if (cache := report["cache_pointer"]) is not None:
        table.add_row("cache pointer", f"window {cache['window']:,} tokens, θ {cache['theta']:g}, "
                                       f"λ {cache['weight']:g} (used by perplexity)")
    return table


def _count(value: Any) -> str:
    """A count from a checkpoint's training state, or '?' where it lacks one."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "?"


def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if isinstance(value, (int, float)) and math.isfinite(value) else "? s"


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
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.api import loss_curves

        curves = loss_curves(run)
        metrics = curves.metrics
        if as_json:
            sys.stdout.write(jsonio.dumps(curves.to_dict()) + "\n")
        else:
            sys.stdout.write(curves.chart(width=width, height=height) + "\n")
            if (best := metrics.best) is not None:
                sys.stdout.write(f"best val loss {best[1]:.4f} nats/token at step {int(best[0]):,}\n")
        if metrics.skipped_lines:
            err.print(f"charlm: note: skipped {metrics.skipped_lines} unreadable line(s) of {metrics.path}",
                      markup=False)
        if png is not None:
            err.print(f"charlm: saved {curves.save_png(png)}", markup=False)


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
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor numpy.
        from charlm.api import export_onnx

        exported = export_onnx(out, checkpoint=checkpoint, batch_size=batch_size, opset=opset, check=check)
        if exported.check_skipped:
            err.print('charlm: note: onnxruntime is not installed, so the graph was not checked '
                      '(pip install "charlm[export]")', markup=False)
        result, difference = exported.onnx, exported.max_abs_difference
        if as_json:
            sys.stdout.write(jsonio.dumps(exported.to_dict()) + "\n")
            return
        console.print(f"wrote {result.path} (inputs {', '.join(result.input_names)}; outputs "
                      f"{', '.join(result.output_names)}; opset {result.opset})", markup=False)
        console.print(f"description: {result.sidecar}", markup=False)
        if difference is not None:
            console.print(f"checked with onnxruntime: largest difference {difference:.2g}", markup=False)


