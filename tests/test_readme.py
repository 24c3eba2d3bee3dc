import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line][-1]
    assert ci_command in readme
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quick_start.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and commands[1] == ci_command and "charlm train" in commands[0]


def _section(readme: str, title: str) -> str:
    return readme.split(title, 1)[1].split("\n#", 1)[0]


def _blocks(text: str, language: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split(f"```{language}\n")[1:]]


@pytest.mark.slow
def test_the_openai_client_examples_run_as_written(trained_run, tmp_path):
    """README's "Use it from any OpenAI client": its Python and curl examples against a real server
    whose model is named as they name it (only the port differs, and the prompt: the tiny test
    model has never seen an 'E' or an 'O')."""
    pytest.importorskip("openai")
    from serving import Server

    section = _section((ROOT / "README.md").read_text(encoding="utf-8"), "### Use it from any OpenAI client")
    [python], [shell] = _blocks(section, "python"), _blocks(section, "bash")
    run = tmp_path / "tinyshakespeare"
    shutil.copytree(trained_run, run)
    server = Server(run)
    try:
        port = str(server.port)
        out = subprocess.run([sys.executable, "-c", python.replace("8000", port).replace("ROMEO:", "First")], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and len(out.stdout) > 50, out.stderr
        if shutil.which("curl"):
            out = subprocess.run(["bash", "-c", shell.replace("8000", port).replace("ROMEO:", "First")], capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0 and out.stdout.rstrip().endswith("data: [DONE]"), out.stdout + out.stderr
            chunks = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("data: {")]
            assert len("".join(c["choices"][0]["text"] for c in chunks if c["choices"])) == 50
    finally:
        assert server.stop() == 0
