"""Loss curves of a run: read ``metrics.jsonl``, draw them as plain text or save a PNG.

``charlm train`` appends one JSON object per line to ``<run>/metrics.jsonl``: ``start`` (again on
every resume), ``step`` (the mean training loss since the last one), ``eval`` (the validation
loss), ``bad_step``, ``interrupt`` and ``end``. The text chart is ASCII only, with no colour
codes, so it reads the same in a terminal, a log file or a CI page; the PNG needs matplotlib,
which is an optional extra (``pip install "charlm[plot]"``).
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from charlm.errors import ConfigError, MetricsError, MissingDependencyError
from charlm.fsutil import atomic_write

METRICS_FILE = "metrics.jsonl"
MARKERS = "*o+x#"

Point = tuple[float, float]


@dataclass
class Metrics:
    path: Path
    train: list[Point] = field(default_factory=list)  # (step, mean training loss over the interval)
    val: list[Point] = field(default_factory=list)  # (step, validation loss in nats/token)
    val_bpc: list[Point] = field(default_factory=list)
    lr: list[Point] = field(default_factory=list)
    start: dict[str, Any] | None = None  # the first start event: configs, sizes, device
    end: dict[str, Any] | None = None  # the last end event, if the run finished
    resumes: int = 0
    skipped_lines: int = 0  # lines that were not JSON objects (e.g. one cut short by a crash)

    @property
    def best(self) -> Point | None:
        return min(self.val, key=lambda p: p[1]) if self.val else None

    def series(self) -> dict[str, list[Point]]:
        return {"train loss": self.train, "val loss": self.val}


def metrics_path(run: str | os.PathLike[str]) -> Path:
    run = Path(run)
    return run / METRICS_FILE if run.is_dir() else run


def read_metrics(run: str | os.PathLike[str]) -> Metrics:
    """Parse a run folder's metrics.jsonl (or that file itself).

    A resumed run appends a new ``start`` at the step it resumed from; points logged after that
    step by the interrupted attempt are dropped, since the resumed run redid those steps. A line
    that is not a JSON object (a crash can cut the last one short) is skipped and counted.
    """
    path = metrics_path(run)
    if not path.is_file():
        raise MetricsError(f"{path}: no such file; pass a run folder written by charlm train")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise MetricsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    metrics = Metrics(path)
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            metrics.skipped_lines += 1
            continue
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            metrics.skipped_lines += 1
            continue
        kind = event["event"]
        if kind not in _STEPPED:  # an event with no place on the chart (cache, warning, or a newer kind)
            continue
        if not isinstance(event.get("step"), (int, float)) or isinstance(event["step"], bool):
            metrics.skipped_lines += 1
            continue
        step = float(event["step"])
        if kind == "start":
            if metrics.start is None:
                metrics.start = event
            else:
                metrics.resumes += 1
                for points in (metrics.train, metrics.val, metrics.val_bpc, metrics.lr):
                    points[:] = [p for p in points if p[0] <= step]
            metrics.end = None
        elif kind == "step":
            _append(metrics.train, step, event.get("loss"))
            _append(metrics.lr, step, event.get("lr"))
        elif kind == "eval":
            _append(metrics.val, step, event.get("val_loss"))
            _append(metrics.val_bpc, step, event.get("val_bpc"))
        elif kind == "end":
            metrics.end = event
    return metrics


# The events the chart reads, each at a step; any other event is not drawn, and not "unreadable".
_STEPPED = ("start", "step", "eval", "end")


def _append(points: list[Point], step: float, value: Any) -> None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        points.append((step, float(value)))


# ── the text chart ──────────────────────────────────────────────────────────────────────────────

def _label(value: float) -> str:
    return f"{int(value)}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def terminal_chart(points: Metrics | Mapping[str, Sequence[Point]], *, width: int = 60, height: int = 12,
                   x_label: str = "step") -> str:
    """A plain-text chart of one or more (x, y) series: ASCII only, no colour codes.

    ``points`` is a ``Metrics`` (train and val loss) or a mapping of series name → points. Each
    column shows the mean of the points that fall in it; later series draw over earlier ones,
    so the few validation points stay visible over the dense training curve. The y axis is
    labelled with the highest (top row) and lowest (bottom row) value drawn, the x axis with the
    first and last x.
    """
    if width < 10 or height < 3:
        raise ConfigError("a chart needs width ≥ 10 and height ≥ 3")
    series = points.series() if isinstance(points, Metrics) else dict(points)
    series = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
              for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        raise MetricsError("nothing to plot yet: no loss has been logged")
    if len(series) > len(MARKERS):
        raise ConfigError(f"at most {len(MARKERS)} series fit one chart")
    xs = [x for pts in series.values() for x, _ in pts]
    x_min, x_max = min(xs), max(xs)
    x_span = (x_max - x_min) or 1.0
    # Each series as column → mean y; the y range is that of what is drawn, so labels match marks.
    drawn: list[dict[int, float]] = []
    for pts in series.values():
        columns: dict[int, list[float]] = {}
        for x, y in pts:
            columns.setdefault(round((x - x_min) / x_span * (width - 1)), []).append(y)
        drawn.append({col: sum(values) / len(values) for col, values in columns.items()})
    ys = [y for columns in drawn for y in columns.values()]
    y_min, y_max = min(ys), max(ys)
    y_span = (y_max - y_min) or 1.0

    grid = [[" "] * width for _ in range(height)]
    for marker, columns in zip(MARKERS, drawn):
        for col, y in columns.items():
            row = round((y_max - y) / y_span * (height - 1)) if y_max != y_min else height // 2
            grid[row][col] = marker

    top, bottom = _label(y_max), _label(y_min)
    pad = max(len(top), len(bottom))
    lines = []
    for row, cells in enumerate(grid):
        label = top if row == 0 else bottom if row == height - 1 else ""
        lines.append(f"{label:>{pad}} |{''.join(cells)}".rstrip())
    lines.append(f"{'':>{pad}} +{'-' * width}")
    left, right = _label(x_min), _label(x_max)
    gap = max(1, width - len(left) - len(right))
    lines.append(f"{'':>{pad}}  {left}{' ' * gap}{right}" if x_max != x_min else f"{'':>{pad}}  {left}")
    legend = "   ".join(f"{marker} {name}" for marker, name in zip(MARKERS, series))
    lines.append(f"{'':>{pad}}  {x_label}: {legend}")
    return "\n".join(lines)


# ── the PNG ─────────────────────────────────────────────────────────────────────────────────────

def save_png(run: str | os.PathLike[str], out_path: str | os.PathLike[str], *, dpi: int = 120,
             title: str | None = None) -> Path:
    """Draw train and validation loss against step into a PNG file, written atomically."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError('saving a PNG needs matplotlib: pip install "charlm[plot]" '
                                     '(or use the text chart)') from None
    metrics = read_metrics(run)
    if not metrics.train and not metrics.val:
        raise MetricsError(f"{metrics.path}: nothing to plot yet: no loss has been logged")

    # The object API, not pyplot: no global figure state and no GUI backend is ever chosen.
    figure = Figure(figsize=(8, 4.5), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if metrics.train:
        axes.plot(*zip(*metrics.train), linewidth=1, label="train loss")
    if metrics.val:
        axes.plot(*zip(*metrics.val), marker="o", linewidth=1.5, label="val loss")
    if (best := metrics.best) is not None:
        axes.annotate(f"best {best[1]:.4f}", best, textcoords="offset points", xytext=(0, -16),
                      ha="center", fontsize=8)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title if title is not None else metrics.path.parent.name)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    out = Path(out_path)
    atomic_write(out, buffer.getvalue(), intact="nothing was written")
    return out


# ── a run's curves, as the plot command and charlm.api.loss_curves give them ────────────────────

@dataclass(frozen=True)
class LossCurves:
    """A run's loss curves: its metrics, given as JSON, drawn as text, or saved as a PNG."""

    run: Path
    metrics: Metrics

    def to_dict(self) -> dict[str, Any]:
        """As ``charlm plot --json`` prints it."""
        m = self.metrics
        return {"run": str(self.run), "train_loss": m.train, "val_loss": m.val, "val_bpc": m.val_bpc,
                "best": m.best, "resumes": m.resumes, "finished": m.end is not None}

    def chart(self, *, width: int = 60, height: int = 12) -> str:
        """The text chart of the training and validation loss (``terminal_chart``)."""
        return terminal_chart(self.metrics, width=width, height=height)

    def save_png(self, out_path: str | os.PathLike[str]) -> Path:
        """The chart as a PNG at ``out_path`` (needs matplotlib); returns its path."""
        return save_png(self.run, out_path)


def read_loss_curves(run: str | os.PathLike[str]) -> LossCurves:
    """The loss curves of the run in folder ``run`` (or of its metrics.jsonl file itself)."""
    return LossCurves(Path(run), read_metrics(run))
