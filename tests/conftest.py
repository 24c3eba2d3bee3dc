from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
) * 30


# The kinds of test the fast tier (pytest -m "not slow") leaves out; each is marked slow here, so
# the whole suite (CI, README's command) runs them and the inner loop does not.
SLOW_KINDS = ("processes", "server", "distributed", "browser", "fuzz")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _private_token_cache(tmp_path_factory):
    """Keep the token cache of every test run (and its child processes) out of ~/.cache."""
    old = os.environ.get("CHARLM_CACHE_DIR")
    os.environ["CHARLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    if old is None:
        os.environ.pop("CHARLM_CACHE_DIR", None)
    else:
        os.environ["CHARLM_CACHE_DIR"] = old


def skip_without_bf16_kernel(cell: str = "lstm") -> None:
    """Skip a test that runs ``cell``'s recurrence in bf16 on the CPU where this CPU's kernels cannot
    (an AVX2-only CPU; or CHARLM_SIMULATE_NO_BF16=1, which plays one on any machine)."""
    from charlm.model.precision import cpu_bf16_kernel_runs

    if (why := cpu_bf16_kernel_runs(cell)) is not None:
        pytest.skip(f"this CPU has no bf16 {cell} kernel ({why})")


@pytest.fixture
def bf16_kernel() -> None:
    """The test needs a native bf16 LSTM kernel on the CPU (skipped where the probe finds none)."""
    skip_without_bf16_kernel("lstm")


@pytest.fixture
def no_bf16_kernels(monkeypatch):
    """This process plays a CPU whose kernels cannot run bf16 recurrences and that reports no bf16
    instructions, as an AVX2-only CPU does (child processes inherit it through the environment)."""
    from charlm import cpu

    monkeypatch.setenv(cpu.SIMULATE_NO_BF16, "1")
    cpu.install_missing_bf16_kernels(monkeypatch.setattr)
    cpu.cpu_bf16_instructions.cache_clear()
    yield
    monkeypatch.undo()
    cpu.cpu_bf16_instructions.cache_clear()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return TINY_TEXT


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The real benchmark corpus; tests needing it skip on a fresh clone without ../shared."""
    if not SHARED_CORPUS.is_file():
        pytest.skip("../shared/corpora/tinyshakespeare.txt is not present")
    return SHARED_CORPUS.read_text(encoding="utf-8")


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A small char model trained once for the tests that need a checkpoint."""
    from charlm.config import ModelConfig, TrainConfig
    from charlm.data.text import prepare_data
    from charlm.training.loop import train

    run_dir = tmp_path_factory.mktemp("run")
    data = prepare_data(TINY_TEXT, val_fraction=0.1)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=32, embed_size=16, num_layers=2)
    train_cfg = TrainConfig(seq_len=32, batch_size=4, lr=1e-2, max_steps=60, eval_every=20, warmup_steps=5,
                            device="cpu")
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=run_dir, source="tiny")
    return run_dir


def run_together(commands: list[list[str]], *, timeout: float = 180, **popen: object) -> list[subprocess.CompletedProcess]:
    """Run independent command lines at once (each pays its own interpreter and torch import, which
    overlap on two cores) and return them completed, in order."""
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
             for command in commands]
    done = []
    for command, proc in zip(commands, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
    return done


def subprocess_env() -> dict[str, str]:
    """The environment for `python -m charlm` in a child process, importing this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env
