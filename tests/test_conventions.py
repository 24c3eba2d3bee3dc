"""Conventions users rely on: --help with an example everywhere, --json that parses, plain text when
piped, no colour under NO_COLOR."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from charlm.cli import app
from conftest import run_together, subprocess_env

runner = CliRunner()
COMMANDS = [["train"], ["sample"], ["perplexity"], ["info"], ["score"], ["plot"], ["export"], ["bench"],
            ["corpus", "list"], ["corpus", "get"], ["serve"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_help_has_a_worked_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example: charlm " in result.stdout


def test_json_outputs_parse(tmp_path, tiny_corpus):
    run = tmp_path / "run"
    train = runner.invoke(app, ["train", str(tiny_corpus), "--out", str(run), "--max-steps", "20",
                                "--hidden-size", "32", "--batch-size", "4", "--seq-len", "16", "--sample-length",
                                "20", "--json"])
    assert train.exit_code == 0, train.output
    report = json.loads(train.stdout)
    assert report["steps"] == 20 and report["best_val_loss"] > 0 and len(report["sample"]) > 0
    for args in (["perplexity", str(tiny_corpus), "--checkpoint", str(run), "--json"],
                 ["info", str(run), "--json"],
                 ["bench", "--hidden-size", "16", "--embed-size", "8", "--batch-size", "2", "--seq-len", "8",
                  "--steps", "20", "--repeats", "1", "--sample-streams", "2", "--device", "cpu", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert isinstance(json.loads(result.stdout), dict), args


@pytest.mark.processes
def test_piped_output_has_no_escape_codes(tmp_path, tiny_corpus):
    env = subprocess_env()

    def charlm(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "charlm", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "\x1b[" not in done.stdout and "\x1b[" not in done.stderr, args
        return done

    charlm("train", str(tiny_corpus), "--out", "run", "--max-steps", "20", "--hidden-size", "32", "--batch-size", "4",
           "--seq-len", "16", "--sample-length", "20")
    (tmp_path / "lines.txt").write_text("First Citizen:\nzzqx qxz\n", encoding="utf-8")
    commands = [("sample", "--checkpoint", "run", "--length", "20", "--seed", "1"),
                ("perplexity", str(tiny_corpus), "--checkpoint", "run"), ("info", "run"), ("plot", "run"),
                ("score", "lines.txt", "--checkpoint", "run", "--sort", "best")]
    for args, done in zip(commands, run_together([[sys.executable, "-m", "charlm", *args] for args in commands],
                                                 cwd=tmp_path, env=env, timeout=300)):
        assert done.returncode == 0, done.stderr
        assert "\x1b[" not in done.stdout and "\x1b[" not in done.stderr, args


@pytest.mark.processes
def test_no_color_on_a_terminal(trained_run):
    """On a real (pseudo-)terminal NO_COLOR must still switch colour codes off."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: charlm with its output on the terminal
        os.environ.update(subprocess_env())
        os.environ["NO_COLOR"] = "1"
        os.environ["TERM"] = "xterm-256color"
        os.execv(sys.executable, [sys.executable, "-m", "charlm", "info", str(trained_run)])
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"parameters" in output
    assert b"\x1b[" not in output


def test_the_package_has_no_import_cycle():
    """The imports charlm's modules run when imported (`from charlm.x import y` at module level, not
    a CLI command's lazy ones inside its function) form an acyclic graph."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "charlm"
    names = {}
    for path in package.rglob("*.py"):  # serve/x.py is "charlm.serve.x", serve/__init__.py "charlm.serve"
        parts = ["charlm", *path.relative_to(package).with_suffix("").parts]
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def at_import_time(tree):  # statements run when the module is imported: not inside functions
        for node in ast.iter_child_nodes(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield node
                yield from at_import_time(node)

    graph = {}
    for name, path in names.items():
        edges = set()
        for node in at_import_time(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in targets:
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    assert len(graph) > 40 and graph["charlm.api"], "the checks see charlm's modules and their imports"

    done = set()

    def visit(module, trail):
        assert module not in trail, " → ".join([*trail, module])
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*trail, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_the_cli_module_decides_nothing_about_runs():
    """The decisions of a training run live in training/plan.py: the CLI never sizes a model or builds a config."""
    from pathlib import Path

    source = "".join(path.read_text(encoding="utf-8")
                     for path in (Path(__file__).resolve().parents[1] / "charlm" / "cli").glob("*.py"))
    for name in ("auto_size", "ModelConfig(", "resume_configs", "new_run_dir", "prepare_corpus", "load_resume"):
        assert name not in source, name
