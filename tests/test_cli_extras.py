"""CLI: corpus list/get, train NAME, score, plot and export, through Typer's CliRunner."""
from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest
from typer.testing import CliRunner

from charlm.cli import app
from conftest import SHARED_CORPUS

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


def test_corpus_list_json(tmp_path):
    result = invoke("corpus", "list", "--root", tmp_path, "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)["corpora"]}
    assert {"tinyshakespeare", "enwik8", "text8", "ptb", "ptb-char", "wikitext-2"} <= set(rows)
    assert not rows["enwik8"]["prepared"] and rows["enwik8"]["download_bytes"] == 36_445_475


@pytest.mark.processes
def test_corpus_get_from_a_file_mirror_then_train_by_name(tmp_path, monkeypatch):
    if not SHARED_CORPUS.is_file():
        pytest.skip("../shared/corpora/tinyshakespeare.txt is not present")
    (tmp_path / "mirror" / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(SHARED_CORPUS, tmp_path / "mirror" / "tinyshakespeare" / "input.txt")
    monkeypatch.chdir(tmp_path)
    env = {"CHARLM_CORPUS_MIRROR": (tmp_path / "mirror").as_uri()}
    result = invoke("corpus", "get", "tinyshakespeare", "--json", env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["downloaded"] and report["files"][0]["verified_by"] == "sha256"
    assert set(report["splits"]) == {"train", "valid"}
    again = invoke("corpus", "get", "tinyshakespeare", env=env)
    assert again.exit_code == 0 and "already here" in again.stderr
    trained = invoke("train", "tinyshakespeare", "--max-steps", "3", "--hidden-size", "16", "--batch-size", "2",
                     "--seq-len", "16", "--sample-length", "0", "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "checkpoints" / "tinyshakespeare" / "best.safetensors").is_file()


def test_corpus_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unknown = invoke("corpus", "get", "enwik9")
    assert unknown.exit_code == 2 and "available: tinyshakespeare" in unknown.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    offline = invoke("corpus", "get", "ptb", "--mirror", f"http://127.0.0.1:{port}")
    assert offline.exit_code == 1
    error = offline.stderr.strip().splitlines()[-1]
    assert error.startswith("charlm: error: cannot download ptb.train.txt from http://127.0.0.1:")
    assert "check your internet connection" in error
    not_yet = invoke("train", "ptb", "--max-steps", "1")
    assert not_yet.exit_code == 1 and "run: charlm corpus get ptb" in not_yet.stderr


def test_score_sorts_and_reports_json(trained_run, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First Citizen:\nqzx jvw kkq\n\nAll:\n")
    result = invoke("score", lines, "--checkpoint", trained_run, "--sort", "best", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["line"] for row in report["lines"]][-1] == 2  # the garbled line scores worst
    assert len(report["lines"]) == 3  # the empty line is skipped
    first = report["lines"][0]
    assert first["perplexity"] == pytest.approx(2.718281828459045 ** first["nats_per_token"])
    table = invoke("score", lines, "--checkpoint", trained_run, "--top", "1")
    assert table.exit_code == 0 and "First Citizen:" in table.stdout and "All:" not in table.stdout
    bad = invoke("score", lines, "--checkpoint", trained_run, "--sort", "sideways")
    assert bad.exit_code == 2


def test_plot_text_json_and_png(trained_run, tmp_path):
    result = invoke("plot", trained_run)
    assert result.exit_code == 0 and "* train loss" in result.stdout and "best val loss" in result.stdout
    report = json.loads(invoke("plot", trained_run, "--json").stdout)
    assert report["finished"] and report["val_loss"] and report["best"][1] == min(v for _, v in report["val_loss"])
    missing = invoke("plot", tmp_path)
    assert missing.exit_code == 1 and "metrics.jsonl: no such file" in missing.stderr
    pytest.importorskip("matplotlib")
    png = invoke("plot", trained_run, "--png", tmp_path / "loss.png")
    assert png.exit_code == 0 and (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_export_checks_the_graph(trained_run, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = invoke("export", tmp_path / "model.onnx", "--checkpoint", trained_run, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inputs"] == ["tokens", "h", "c"] and report["max_abs_difference"] < 1e-4
    assert json.loads((tmp_path / "model.onnx.json").read_text())["tokenizer"]["kind"] == "char"


def test_info_plot_and_score_print_what_the_api_gives_python(trained_run, tmp_path):
    """info, plot and score render what charlm.api.info, loss_curves and score_text return."""
    from charlm import api, jsonio

    assert invoke("info", trained_run, "--json").stdout == jsonio.dumps(api.info(trained_run)) + "\n"
    assert "parameters" in invoke("info", trained_run).stdout

    curves = api.loss_curves(trained_run)
    assert invoke("plot", trained_run, "--json").stdout == jsonio.dumps(curves.to_dict()) + "\n"
    chart = invoke("plot", trained_run, "--width", "40", "--height", "6").stdout
    best = curves.metrics.best
    assert chart == (curves.chart(width=40, height=6) + "\n"
                     + f"best val loss {best[1]:.4f} nats/token at step {int(best[0]):,}\n")

    lines = tmp_path / "lines.txt"
    lines.write_text("First Citizen:\nqzx jvw kkq\n\nAll:\nSpeak, speak.\n")
    printed = invoke("score", lines, "--checkpoint", trained_run, "--sort", "worst", "--top", "3", "--keep-empty",
                     "--no-include-end", "--device", "cpu", "--json")
    scored = api.score_text(lines.read_text(), trained_run, sort="worst", top=3, skip_empty=False,
                            include_end=False, device="cpu")
    assert printed.stdout == jsonio.dumps({"file": str(lines), **scored.to_dict()}) + "\n"
    assert len(scored.lines) == 3 and scored.lines[0].line == 3  # the empty line, nothing scored, counts as worst
    table = invoke("score", lines, "--checkpoint", trained_run, "--sort", "worst", "--top", "3", "--keep-empty",
                   "--no-include-end", "--device", "cpu").stdout
    for row in scored.lines:
        assert f"{row.score.nats_per_token:.4f}" in table


def test_export_prints_what_the_api_gives_python(trained_run, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from charlm import api, jsonio
    from charlm.errors import MissingDependencyError

    out = tmp_path / "model.onnx"
    printed = invoke("export", out, "--checkpoint", trained_run, "--check", "--json").stdout
    exported = api.export_onnx(out, checkpoint=trained_run, check=True)
    assert printed == jsonio.dumps(exported.to_dict()) + "\n"
    assert exported.max_abs_difference is not None and not exported.check_skipped

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    unchecked = api.export_onnx(out, checkpoint=trained_run)
    assert unchecked.max_abs_difference is None and unchecked.check_skipped
    assert not api.export_onnx(out, checkpoint=trained_run, check=False).check_skipped
    with pytest.raises(MissingDependencyError):
        api.export_onnx(out, checkpoint=trained_run, check=True)
    result = invoke("export", out, "--checkpoint", trained_run, "--json")
    assert result.stdout == jsonio.dumps(unchecked.to_dict()) + "\n"
    assert "onnxruntime is not installed, so the graph was not checked" in result.stderr
    assert invoke("export", out, "--checkpoint", trained_run, "--check").exit_code == 1
