"""Reading metrics.jsonl and drawing loss curves as text and PNG."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from charlm.errors import ConfigError, MetricsError, MissingDependencyError
from charlm.training.plot import Metrics, read_loss_curves, read_metrics, save_png, terminal_chart

from conftest import TINY_TEXT


def write_events(path, events, *, tail: str = ""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail, encoding="utf-8")


def run_events(steps=range(10, 110, 10), evals=(50, 100), start_step=0):
    events = [{"event": "start", "step": start_step, "total_steps": 100, "num_parameters": 1234}]
    for step in steps:
        events.append({"event": "step", "step": step, "loss": 4.0 / (1 + step / 20), "lr": 1e-3})
        if step in evals:
            events.append({"event": "eval", "step": step, "val_loss": 3.0 / (1 + step / 40), "val_bpc": 1.5,
                           "improved": True, "best_val_loss": 0.0})
    return events


def test_read_metrics_collects_train_and_val_points(tmp_path):
    events = run_events() + [{"event": "end", "step": 100, "stopped_by": "done"}]
    write_events(tmp_path / "metrics.jsonl", events)
    metrics = read_metrics(tmp_path)
    assert [s for s, _ in metrics.train] == list(range(10, 110, 10))
    assert metrics.train[0] == (10, pytest.approx(4.0 / 1.5))
    assert metrics.val == [(50, pytest.approx(3.0 / 2.25)), (100, pytest.approx(3.0 / 3.5))]
    assert metrics.best == (100, pytest.approx(3.0 / 3.5))
    assert metrics.start["num_parameters"] == 1234 and metrics.end["stopped_by"] == "done"
    assert metrics.resumes == 0 and metrics.skipped_lines == 0
    assert read_metrics(tmp_path / "metrics.jsonl").train == metrics.train  # the file itself works too


def test_a_resume_drops_the_steps_it_redid_and_a_torn_line_is_skipped(tmp_path):
    first = run_events(steps=range(10, 80, 10), evals=(50,))  # killed after logging step 70, saved at 50
    resumed = run_events(steps=range(60, 110, 10), evals=(100,), start_step=50)
    write_events(tmp_path / "metrics.jsonl", first + resumed, tail='{"event": "step", "st')
    metrics = read_metrics(tmp_path)
    assert [s for s, _ in metrics.train] == list(range(10, 110, 10))
    assert [s for s, _ in metrics.val] == [50, 100]
    assert metrics.resumes == 1 and metrics.skipped_lines == 1 and metrics.end is None


def test_non_finite_values_are_left_out(tmp_path):
    events = [{"event": "start", "step": 0}, {"event": "step", "step": 10, "loss": 2.0},
              {"event": "eval", "step": 10, "val_loss": float("inf")}, {"event": "step", "step": 20, "loss": float("nan")}]
    write_events(tmp_path / "metrics.jsonl", events)
    metrics = read_metrics(tmp_path)
    assert metrics.train == [(10, 2.0)] and metrics.val == []


def test_a_folder_without_metrics_is_an_error(tmp_path):
    with pytest.raises(MetricsError, match="metrics.jsonl: no such file"):
        read_metrics(tmp_path)


def test_metrics_of_a_real_training_run(tmp_path):
    from charlm.config import ModelConfig, TrainConfig
    from charlm.data.text import prepare_data
    from charlm.training.loop import train

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = prepare_data(TINY_TEXT, val_fraction=0.1)
        train(model_config=ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=16, embed_size=8,
                                       num_layers=1),
              train_config=TrainConfig(seq_len=16, batch_size=4, lr=1e-2, max_steps=30, eval_every=10,
                                       warmup_steps=2, device="cpu"),
              data=data, run_dir=tmp_path, source="tiny")
    finally:
        torch.set_num_threads(previous)
    metrics = read_metrics(tmp_path)
    assert [s for s, _ in metrics.train] == [10, 20, 30]
    assert [s for s, _ in metrics.val] == [10, 20, 30]
    assert metrics.end is not None and metrics.start["model_config"]["hidden_size"] == 16
    chart = terminal_chart(metrics)
    assert "train loss" in chart and "val loss" in chart


def chart_lines(chart):
    return chart.split("\n")


def test_terminal_chart_shape_labels_and_markers():
    metrics = Metrics(path=None, train=[(s, 4.0 / (1 + s / 20)) for s in range(10, 2010, 10)],
                      val=[(s, 3.0 / (1 + s / 40)) for s in (500, 1000, 1500, 2000)])
    chart = terminal_chart(metrics, width=60, height=12)
    lines = chart_lines(chart)
    assert len(lines) == 12 + 3  # plot rows, axis, x labels, legend
    assert all(len(line) <= 6 + 2 + 60 for line in lines)
    # 200 training points in 60 columns: each column is drawn at the mean of its points.
    first = [y for s, y in metrics.train if round((s - 10) / 1990 * 59) == 0]
    last = [y for s, y in metrics.train if round((s - 10) / 1990 * 59) == 59]
    top, bottom = f"{sum(first) / len(first):.4g}", f"{sum(last) / len(last):.4g}"
    assert lines[0].lstrip().startswith(f"{top} |") and lines[11].lstrip().startswith(f"{bottom} |")
    assert len({line.index("|") for line in lines[:12]}) == 1  # labels right-aligned on one axis
    assert lines[12].strip() == "+" + "-" * 60
    assert lines[13].split() == ["10", "2000"]
    assert "* train loss" in lines[14] and "o val loss" in lines[14]
    assert chart.count("o") >= 4 + 1  # four val points (each its own column) and the legend's "o"
    # The first training point is the highest: top row, first column.
    assert lines[0].split("|", 1)[1].startswith("*")
    assert chart.isascii() and "\x1b" not in chart


def test_terminal_chart_from_a_mapping_and_edge_cases():
    chart = terminal_chart({"loss": [(0, 1.0), (1, 0.5), (2, 0.25)]}, width=20, height=5, x_label="epoch")
    lines = chart_lines(chart)
    assert len(lines) == 5 + 3 and "epoch: * loss" in lines[-1]
    assert lines[0] == "   1 |*" and lines[3] == "     |" + " " * 10 + "*" and lines[4] == "0.25 |" + " " * 19 + "*"
    single = terminal_chart({"loss": [(5, 2.0)]}, width=10, height=3)
    assert "*" in single and "2" in single
    with pytest.raises(MetricsError):
        terminal_chart({"loss": [], "val": [(1, math.nan)]})
    with pytest.raises(ConfigError):
        terminal_chart({"loss": [(0, 1.0)]}, width=5)


def test_save_png_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    write_events(tmp_path / "metrics.jsonl", run_events())
    out = save_png(tmp_path, tmp_path / "plots" / "loss.png")
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 5000
    assert not list((tmp_path / "plots").glob(".*tmp*"))


def test_save_png_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    write_events(tmp_path / "metrics.jsonl", run_events())
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r'pip install "charlm\[plot\]"'):
        save_png(tmp_path, tmp_path / "loss.png")


def test_loss_curves_give_the_metrics_as_json_a_chart_and_a_png(tmp_path):
    write_events(tmp_path / "metrics.jsonl", run_events())
    curves = read_loss_curves(tmp_path)
    metrics = read_metrics(tmp_path)
    assert curves.run == tmp_path and curves.metrics == metrics
    assert curves.to_dict() == {"run": str(tmp_path), "train_loss": metrics.train, "val_loss": metrics.val,
                                "val_bpc": metrics.val_bpc, "best": metrics.best, "resumes": metrics.resumes,
                                "finished": metrics.end is not None}
    assert curves.chart(width=30, height=5) == terminal_chart(metrics, width=30, height=5)
    with pytest.raises(MetricsError, match="no such file"):
        read_loss_curves(tmp_path / "elsewhere")
    pytest.importorskip("matplotlib")
    assert curves.save_png(tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
