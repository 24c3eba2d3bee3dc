"""Hardening, third round (issue 32): inputs that block or lie about their size, terminals that
obey what a file says, work with no end, output that vanishes, folders someone else made, and
small lies in charlm's own output. One class per section; each test failed before its fix."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import charlm
from charlm.model.checkpoint import save_checkpoint
from charlm.cli import app, main
from charlm.cli.output import safe_text, write_text
from charlm.cli.train import _StopFlag
from charlm.config import ModelConfig
from charlm.data.text import read_corpus, source_kind
from charlm.errors import CorpusError, RunInUseError, SaveError, UsageError
from charlm.fsutil import UnsafeFolderError, append_text, atomic_write, lock_folder, open_lock_file
from charlm.model.lm import RNNLM
from charlm.training.plot import read_metrics
from charlm.data.tokenizer import ByteTokenizer, CharTokenizer, WordTokenizer

from conftest import TINY_TEXT, subprocess_env

runner = CliRunner()
TINY = ["--hidden-size", "16", "--embed-size", "8", "--seq-len", "8", "--batch-size", "2", "--device", "cpu",
        "--max-steps", "2", "--sample-length", "0", "--log-every", "1"]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.output and lines and lines[-1].startswith("charlm: error: "), result.output
    assert sum(line.startswith("charlm: error") for line in lines) == 1, result.stderr
    return lines[-1]


def _checkpoint(path: Path, tokenizer, **train_state) -> Path:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, embed_size=4))
    return save_checkpoint(path, model=model, tokenizer=tokenizer, train_state={"step": 1, **train_state})


def _write_later(fifo: Path, text: str) -> threading.Thread:
    """A writer that opens ``fifo`` (blocking until the reader comes) and writes ``text``."""
    def write() -> None:
        with open(fifo, "w", encoding="utf-8") as fh:
            fh.write(text)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


# ── 1. inputs that block or lie about their size ────────────────────────────────────────────────

@needs_fifo
def test_a_fifo_with_no_writer_is_refused_at_once(tmp_path):
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(CorpusError, match="is empty .a pipe: nothing was written to it, or no program had opened it"):
        read_corpus(fifo)
    assert time.monotonic() - t0 < 5  # before the fix: open() blocked for ever
    line = one_line_error(invoke("train", fifo, *TINY, "--out", tmp_path / "run"), 1)
    assert "a pipe" in line


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_character_device_is_refused_before_a_byte_is_read(tmp_path, device):
    with pytest.raises(CorpusError, match="is a character device"):
        source_kind(device)
    line = one_line_error(invoke("train", device, *TINY, "--out", tmp_path / "run"), 1)
    assert line == (f"charlm: error: {device}: is a character device (a terminal or a device such as /dev/zero), "
                    f"not a text file; save the text to a file, or pipe it in")
    for command in (["perplexity", device], ["score", device], ["sample", "--prime-file", device]):
        assert "character device" in one_line_error(invoke(*command), 1)


@needs_fifo
def test_a_pipe_is_text_like_any_other(tmp_path, one_thread):
    """`charlm train <(zcat corpus.gz)`: the pipe is read once, into the token cache (keyed by its
    content, so the same text piped again is not tokenized again), and trains like the file."""
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    writer = _write_later(fifo, TINY_TEXT)
    piped = invoke("train", fifo, *TINY, "--out", tmp_path / "piped", "--json")
    writer.join(5)
    assert piped.exit_code == 0, piped.output
    assert "tokenizing" in piped.stderr and f"{fifo} (a pipe, copied)" in piped.stderr
    state = charlm.load(tmp_path / "piped").checkpoint.train_state
    assert state["corpus"] == str(fifo)
    spool = Path(os.environ["CHARLM_CACHE_DIR"]) / "spool"
    assert not [p for p in spool.iterdir()]  # the copy is gone

    writer = _write_later(fifo, TINY_TEXT)
    again = invoke("train", fifo, *TINY, "--out", tmp_path / "again", "--json")
    writer.join(5)
    assert again.exit_code == 0 and "tokenizing" not in again.stderr, again.output  # the cache entry, by content

    plain = tmp_path / "corpus.txt"
    plain.write_text(TINY_TEXT, encoding="utf-8")
    from_file = invoke("train", plain, *TINY, "--out", tmp_path / "file", "--json")
    assert json.loads(from_file.stdout)["best_val_loss"] == json.loads(piped.stdout)["best_val_loss"]


@needs_fifo
def test_a_prime_or_scored_file_may_be_a_pipe(tmp_path):
    lm_path = _checkpoint(tmp_path / "m.safetensors", CharTokenizer.fit("ab\n"))
    fifo = tmp_path / "lines.fifo"
    os.mkfifo(fifo)
    writer = _write_later(fifo, "ab\nba\n")
    result = invoke("score", fifo, "--checkpoint", lm_path, "--json")
    writer.join(5)
    assert result.exit_code == 0, result.output
    assert [row["text"] for row in json.loads(result.stdout)["lines"]] == ["ab", "ba"]


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_training_while_it_still_reads_its_corpus(tmp_path, signum, code):
    """A writer that is slow (or never ends): SIGINT/SIGTERM stop the read at once, not at the
    first step, which would never come."""
    read_end, write_end = os.pipe()
    cache = tmp_path / "cache"
    env = {**subprocess_env(), "CHARLM_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "charlm", "train", f"/dev/fd/{read_end}", *TINY,
                              "--out", str(tmp_path / "run")], env=env, pass_fds=(read_end,),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(read_end)
    try:
        os.write(write_end, TINY_TEXT[:1000].encode())  # some text, and the pipe stays open
        _wait_for(lambda: (cache / "spool").is_dir() and any((cache / "spool").iterdir()))
        time.sleep(0.3)
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=20)
    finally:
        os.close(write_end)
        if child.poll() is None:
            child.kill()
    assert child.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == f"charlm: interrupted ({signal.Signals(signum).name})"
    assert not any((cache / "spool").iterdir())  # the partial copy is removed


def test_before_training_starts_a_signal_stops_at_once_and_after_it_saves_first(capsys):
    """Reading and tokenizing a big corpus come before the trainer's start event: a signal then
    interrupts whatever runs (a read, the tokenizer); from the start event on it asks the
    trainer to finish the step and save."""
    flag = _StopFlag()
    with pytest.raises(KeyboardInterrupt) as stopped:
        flag._handle(signal.SIGTERM, None)
    assert stopped.value.exit_code == 143 and flag() is None
    flag.seen({"event": "start", "step": 0})
    flag._handle(signal.SIGINT, None)
    assert flag() == "SIGINT"  # the trainer polls this after the step
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)  # a second Ctrl-C aborts, as before


# ── 2. strings from files reach the terminal as text ────────────────────────────────────────────

HOSTILE = "[/]x[bold red]\x1b]0;pwned\x07\x1b[31m\x9b2J\u202e"


def test_safe_text_escapes_control_characters_and_keeps_text():
    assert safe_text("plain [b]text[/b]\ttab\nline") == "plain [b]text[/b]\ttab\nline"
    assert safe_text(HOSTILE) == "[/]x[bold red]\\x1b]0;pwned\\x07\\x1b[31m\\x9b2J\\u202e"
    assert safe_text("\r\x08\x7f\x00") == "\\x0d\\x08\\x7f\\x00"


def test_info_prints_checkpoint_metadata_as_text(tmp_path):
    path = _checkpoint(tmp_path / "evil.safetensors", CharTokenizer.fit("ab\n"), corpus=HOSTILE)
    result = invoke("info", path)
    assert result.exit_code == 0, result.output  # before: rich.errors.MarkupError traceback
    assert "\x1b" not in result.output and "\x9b" not in result.output and "\u202e" not in result.output
    assert "[/]x[bold red]\\x1b]0;pwned\\x07\\x1b[31m" in result.stdout


def test_error_lines_and_notes_escape_what_came_from_a_file(tmp_path):
    missing = tmp_path / "a\x1b]0;t\x07[red]b.txt"
    line = one_line_error(invoke("perplexity", missing), 1)
    assert "\x1b" not in line and "\x07" not in line and "a\\x1b]0;t\\x07[red]b.txt: no such file" in line
    # a prime word a word model does not know is named in a warning: escaped too
    lm_path = _checkpoint(tmp_path / "w.safetensors", WordTokenizer.fit("a b c\n"))
    result = invoke("sample", "--checkpoint", lm_path, "--prime", "a \x1b[2Jzz", "--length", "3", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stderr and "warning" in result.stderr


def test_generated_text_is_escaped_on_a_terminal_and_raw_in_a_pipe(monkeypatch):
    class Terminal:
        def __init__(self, tty: bool) -> None:
            self.tty, self.written = tty, []

        def isatty(self) -> bool:
            return self.tty

        def write(self, text: str) -> None:
            self.written.append(text)

    for tty, expected in ((True, "a\\x1b[31mb\n"), (False, "a\x1b[31mb\n")):
        fake = Terminal(tty)
        monkeypatch.setattr(sys, "stdout", fake)
        write_text("a\x1b[31mb\n")
        monkeypatch.undo()
        assert fake.written == [expected]


# ── 3. work with no end ─────────────────────────────────────────────────────────────────────────

def test_a_stop_string_the_model_cannot_write_is_refused_before_any_work(tmp_path):
    char_lm = charlm.load(_checkpoint(tmp_path / "c.safetensors", CharTokenizer.fit("abc \n")))
    with pytest.raises(UsageError, match="the stop string 'xa' can never be generated: this model's vocabulary "
                                         "has no 'x'"):
        char_lm.stream(length=10**8, stop="xa")  # refused when asked, not after a billion steps
    with pytest.raises(UsageError, match="can never be generated"):
        char_lm.samples(num_samples=2, length=10**8, stop="Q")
    assert len(char_lm.samples(num_samples=1, length=5, stop="ca", seed=0)) == 1  # writable: accepted
    word_lm = charlm.load(_checkpoint(tmp_path / "w.safetensors", WordTokenizer.fit("the cat\nsat on\n")))
    with pytest.raises(UsageError, match="has no 'b' 'r' 'z' .a word model ends lines with '<EOS>'.$"):
        word_lm.stream(length=10**8, stop="zebra")
    for stop in ("<EOS>", "cat sat", "at\n"):
        word_lm.stream(length=5, stop=stop, seed=0)  # words can write these
    byte_lm = charlm.load(_checkpoint(tmp_path / "b.safetensors", ByteTokenizer()))
    byte_lm.stream(length=5, stop="\u00e9\u4e2d", seed=0)  # bytes can write anything


def test_the_cli_refuses_it_with_one_line_and_prints_nothing(tmp_path):
    path = _checkpoint(tmp_path / "c.safetensors", CharTokenizer.fit("abc \n"))
    result = invoke("sample", "--checkpoint", path, "--stop", "THE END", "--length", "100000000")
    line = one_line_error(result, 2)
    assert line == ("charlm: error: the stop string 'THE END' can never be generated: this model's vocabulary has "
                    "no 'D' 'E' 'H' 'N' 'T'")
    assert result.stdout == ""


@pytest.mark.slow
def test_the_http_api_refuses_it(tmp_path):
    from serving import Server

    path = _checkpoint(tmp_path / "c.safetensors", CharTokenizer.fit("abc \n"))
    server = Server(path, "--max-length", "5000")
    try:
        status, body = server.request("POST", "/v1/generate", {"prime": "a", "length": 5000, "stop": "Z"})
    finally:
        assert server.stop() == 0
    assert status == 422 and "can never be generated" in json.dumps(body), body


# ── 4. output that vanishes ─────────────────────────────────────────────────────────────────────

def test_a_refused_prime_is_not_echoed_first(tmp_path):
    path = _checkpoint(tmp_path / "c.safetensors", CharTokenizer.fit("abc \n"))
    result = invoke("sample", "--checkpoint", path, "--prime", "abcZ")
    one_line_error(result, 2)
    assert result.stdout == ""  # before: "abcZ" went out, then the error


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    path = _checkpoint(tmp_path_factory.mktemp("run") / "best.safetensors", CharTokenizer.fit(TINY_TEXT))
    return path


def _charlm(*args: str, **options):
    return subprocess.run([sys.executable, "-m", "charlm", *args], env=subprocess_env(), text=True,
                          capture_output=options.pop("capture_output", True), timeout=120, **options)


COMMANDS = [["info", "{run}"], ["sample", "--checkpoint", "{run}", "--length", "200", "--seed", "1"],
            ["corpus", "list"]]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_full_or_closed_stdout_is_one_line_and_a_failure(small_run, command):
    args = [a.format(run=small_run) for a in command]
    with open("/dev/full", "w") as full:
        result = _charlm(*args, stdout=full, stderr=subprocess.PIPE, capture_output=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == ["charlm: error: cannot write to standard output: no space left on the "
                                          "device"]
    closed = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", sys.executable, "-m", "charlm", *args],
                            env=subprocess_env(), text=True, stderr=subprocess.PIPE, timeout=120)
    assert closed.returncode == 1, closed.stderr
    assert closed.stderr.splitlines() == ["charlm: error: standard output is closed; redirect it to a file or "
                                          "/dev/null instead"]


@pytest.mark.slow
def test_a_reader_that_went_away_is_one_line_and_a_failure(small_run):
    child = subprocess.Popen([sys.executable, "-m", "charlm", "sample", "--checkpoint", str(small_run),
                              "--length", "100000000"], env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.read(10)
    child.stdout.close()  # `| head -c 10`
    stderr = child.stderr.read()
    assert child.wait(timeout=60) == 1, stderr
    assert stderr.splitlines() == ["charlm: error: cannot write to standard output: the reader went away (broken "
                                   "pipe)"]


# ── 5. folders someone else made ────────────────────────────────────────────────────────────────

def _planted(tmp_path: Path) -> Path:
    """A file outside the run folder that a planted link points at: it must stay as it is."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


@pytest.mark.parametrize("name", ["metrics.jsonl", "best.safetensors", "last.safetensors"])
def test_no_write_goes_through_a_link_planted_in_the_run_folder(tmp_path, name):
    victim = _planted(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    result = invoke("train", TINY_TEXT and _corpus(tmp_path), *TINY, "--out", run)
    assert result.exit_code != 0, result.output
    assert victim.read_text() == "precious\n" and (run / name).is_symlink()
    assert "Traceback" not in result.output


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def test_the_writers_refuse_links_and_special_files(tmp_path):
    victim = _planted(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(SaveError, match="is a symbolic link"):
        atomic_write(link, b"evil")
    with pytest.raises(SaveError, match="is a symbolic link"):
        append_text(link, "evil\n")
    with pytest.raises(SaveError, match="is a symbolic link"):
        open_lock_file(link)
    assert victim.read_text() == "precious\n"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "created-elsewhere")
    for write in (lambda: atomic_write(dangling, b"x"), lambda: append_text(dangling, "x"),
                  lambda: open_lock_file(dangling)):
        with pytest.raises(SaveError):
            write()
    assert not (tmp_path / "created-elsewhere").exists()
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        t0 = time.monotonic()
        with pytest.raises(SaveError, match="cannot write .*fifo"):
            append_text(tmp_path / "fifo", "x\n")  # neither written to nor waited on
        assert time.monotonic() - t0 < 5
    atomic_write(tmp_path / "plain", b"ok")  # and a plain file is written, with no temporary left
    assert (tmp_path / "plain").read_bytes() == b"ok" and [p.name for p in tmp_path.glob(".*")] == []


def test_a_run_folder_that_is_a_link_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeFolderError, match="is a symbolic link"):
        lock_folder(tmp_path / "link")
    line = one_line_error(invoke("train", _corpus(tmp_path), *TINY, "--out", tmp_path / "link"), 2)
    assert "is a symbolic link" in line and not list(real.iterdir())
    fd = lock_folder(real)  # a real folder of ours locks as before
    try:
        with pytest.raises(RunInUseError):
            lock_folder(real)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="no user ids here")
def test_a_run_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "theirs"
    folder.mkdir()
    if os.geteuid() == 0:
        os.chown(folder, 4242, 4242)
    owner = os.stat(folder).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # as if someone else made it
    with pytest.raises(UnsafeFolderError, match=f"belongs to another user .uid {owner}."):
        lock_folder(folder)
    monkeypatch.setattr(os, "geteuid", lambda: owner)
    os.close(lock_folder(folder))  # its owner may


def test_a_link_planted_as_the_token_cache_lock_is_refused(tmp_path, monkeypatch):
    from charlm.data.tokenstore import cache_key, corpus_ids

    victim = _planted(tmp_path)
    corpus = _corpus(tmp_path)
    root = tmp_path / "cache"
    settings = {"kind": "char", "val_fraction": 0.1, "min_count": 1, "max_vocab": None, "encoding_errors": "strict"}
    (root / "locks").mkdir(parents=True)
    (root / "locks" / f"{cache_key([corpus], settings)}.lock").symlink_to(victim)
    with pytest.raises(SaveError, match="symbolic link"):
        corpus_ids(corpus, kind="char", val_fraction=0.1, root=root)
    assert victim.read_text() == "precious\n"


# ── 6. small lies in our own output ─────────────────────────────────────────────────────────────

def test_plot_counts_only_lines_it_cannot_read(tmp_path):
    events = [{"event": "start", "step": 0}, {"event": "step", "step": 1, "loss": 2.0},
              {"event": "eval", "step": 1, "val_loss": 1.5, "val_bpc": 2.0},
              {"event": "cache", "cache": None, "val_loss": 1.5, "val_loss_without": 1.5},  # no step: not a fault
              {"event": "warning", "message": "m"}, {"event": "newer-kind"},
              {"event": "end", "step": 1}]
    lines = [json.dumps(e) for e in events] + ['{"event": "step", "step": "x"}', "[1]", '{"torn']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    metrics = read_metrics(tmp_path)
    assert metrics.skipped_lines == 3 and metrics.train == [(1.0, 2.0)] and metrics.end is not None


def test_plot_of_a_healthy_run_with_the_cache_pointer_says_nothing_is_skipped(tmp_path, one_thread):
    run = tmp_path / "run"
    trained = invoke("train", _corpus(tmp_path), *TINY, "--out", run, "--json")
    assert trained.exit_code == 0, trained.output
    assert any(json.loads(line)["event"] == "cache" for line in (run / "metrics.jsonl").read_text().splitlines())
    result = invoke("plot", run)
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.stderr, result.stderr


@pytest.mark.parametrize("argv, message", [
    (["train", "--hidden-size", "abc"], "charlm: error: Invalid value for '--hidden-size': "),
    (["info", "--bogus"], "charlm: error: No such option: --bogus"),
    (["nosuch"], "charlm: error: No such command 'nosuch'."),
])
def test_an_option_that_does_not_parse_is_one_line(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["charlm", *argv])
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main() guards it; restored after the test
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(message), captured.err
    assert "╭" not in captured.err and "Usage:" not in captured.err


def test_a_link_planted_as_a_downloads_part_file_is_not_followed(tmp_path):
    """The corpus downloader's resumable .part file: a link there is refused, the file it points
    to untouched, whether the download starts or resumes."""
    import io

    from charlm.data import download
    from charlm.errors import SaveError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    part = tmp_path / "x.zip.part"
    part.symlink_to(victim)
    for mode in ("wb", "ab"):
        with pytest.raises(SaveError, match="symbolic link"):
            download._stream_to(io.BytesIO(b"data"), part, mode=mode, done=0, total=None, progress=None)
    assert victim.read_text(encoding="utf-8") == "precious\n"
    part.unlink()
    os.mkfifo(part)
    with pytest.raises(SaveError, match="not a regular file"):
        download._stream_to(io.BytesIO(b"data"), part, mode="wb", done=0, total=None, progress=None)


@needs_fifo
def test_a_fine_tune_that_extends_the_vocabulary_reads_a_pipe_once(tmp_path, one_thread):
    """--extend-vocab reads the corpus twice (its new symbols, then the ids): a pipe is copied once."""
    plain = tmp_path / "corpus.txt"
    plain.write_text(TINY_TEXT, encoding="utf-8")
    assert invoke("train", plain, *TINY, "--out", tmp_path / "base").exit_code == 0
    fifo = tmp_path / "more.fifo"
    os.mkfifo(fifo)
    writer = _write_later(fifo, TINY_TEXT + "Zebras quietly jumped!\n" * 40)
    tuned = invoke("train", fifo, "--init-from", tmp_path / "base", "--extend-vocab", "--max-steps", "2",
                   "--out", tmp_path / "tuned", "--sample-length", "0")
    writer.join(5)
    assert tuned.exit_code == 0, tuned.output
    assert "Z" in charlm.load(tmp_path / "tuned").tokenizer.itos
