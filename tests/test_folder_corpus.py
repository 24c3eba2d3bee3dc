"""A folder of files as the corpus: `charlm train src/ --include '*.c' --include '*.h'`."""
from __future__ import annotations

import os

import numpy as np
import pytest
from typer.testing import CliRunner

from charlm.data.tokenstore import folder_ids
from charlm.model.checkpoint import load_checkpoint
from charlm.cli import app
from charlm.data.tokenizer import CharTokenizer

runner = CliRunner()
SHAPE = ["--hidden-size", "16", "--embed-size", "8", "--seq-len", "8", "--batch-size", "2", "--device", "cpu",
         "--sample-length", "0"]
C_FILE = "int main(void) {\n    return add(1, 2);\n}\n"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "lib" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    files = {
        "main.c": C_FILE * 40,
        "util.h": "int add(int a, int b);\n" * 30,
        "lib/add.c": "int add(int a, int b) { return a + b; }" * 20,  # no final newline: one is added
        "lib/deep/mul.c": "int mul(int a, int b) { return a * b; }\n" * 30,
        "README.md": "not C\n",
        ".git/config.c": "hidden\n",
        "empty.c": "",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "blob.c").write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    (root / "latin.c").write_bytes("/* caf\xe9 */\n".encode("latin-1") * 5)
    return root


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_files_in_path_order_split_by_file_with_separators(tree, tmp_path):
    ids = folder_ids(tree, include=("*.c", "*.h"), kind="char", val_fraction=0.1, root=tmp_path / "cache")
    files = ids.files
    names = [os.path.relpath(p, tree) for p in files["train_paths"] + files["val_paths"]]
    assert names == ["lib/add.c", "lib/deep/mul.c", "main.c", "util.h"]  # by path; hidden, README, bad ones out
    assert files["skipped"] == {"binary": 1, "not UTF-8": 1, "empty": 1}
    assert files["val_paths"] and files["train_paths"]  # whole files on each side
    texts = [(tree / n).read_text() for n in names]
    texts = [t if t.endswith("\n") else t + "\n" for t in texts]
    train_text = "".join(texts[: len(files["train_paths"])])
    tokenizer = CharTokenizer.fit(train_text)
    assert ids.tokenizer.to_dict() == tokenizer.to_dict()
    assert np.array_equal(np.asarray(ids.ids), tokenizer.encode("".join(texts)))
    assert ids.train_chars == len(train_text)
    val_bytes = sum((tree / n).stat().st_size for n in names[len(files["train_paths"]):])
    assert val_bytes >= 0.1 * sum((tree / n).stat().st_size for n in names)


def test_the_cache_key_covers_the_file_list_sizes_and_times(tree, tmp_path):
    root = tmp_path / "cache"
    first = folder_ids(tree, kind="char", val_fraction=0.1, root=root, include=("*.c",))
    assert folder_ids(tree, kind="char", val_fraction=0.1, root=root, include=("*.c",)).folder == first.folder
    (tree / "lib" / "sub.c").write_text("int sub(int a, int b);\n", encoding="utf-8")
    added = folder_ids(tree, kind="char", val_fraction=0.1, root=root, include=("*.c",))
    assert added.folder != first.folder
    os.utime(tree / "main.c", ns=(1, 1))
    assert folder_ids(tree, kind="char", val_fraction=0.1, root=root, include=("*.c",)).folder != added.folder


def test_train_on_a_folder_end_to_end_and_resume(tree, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", tree, "--include", "*.c", "--include", "*.h", "--out", out, "--max-steps", "4", *SHAPE)
    assert result.exit_code == 0, result.output
    assert "skipped 1 binary, 1 empty, 1 not UTF-8 file(s)" in result.stderr
    state = load_checkpoint(out / "last.safetensors").train_state
    assert state["include"] == ["*.c", "*.h"] and state["corpus"] == str(tree.resolve())
    more = invoke("train", "--resume", out, "--max-steps", "6")
    assert more.exit_code == 0, more.output
    assert load_checkpoint(out / "last.safetensors").train_state["step"] == 6
    replace = invoke("train", tree, "--include", "*.c", "--out", tmp_path / "latin", "--max-steps", "2",
                     "--encoding-errors", "replace", *SHAPE)
    assert replace.exit_code == 0 and "not UTF-8" not in replace.stderr, replace.output


def test_word_models_read_folders_too(tree, tmp_path):
    result = invoke("train", tree, "--include", "*.c", "--tokenizer", "word", "--out", tmp_path / "w",
                    "--max-steps", "2", *SHAPE)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, code, message", [
    (["--include", "*.rs"], 1, "no files matching *.rs"),
    (["--include", "blob.c"], 1, "none of its 1 files is UTF-8 text"),
])
def test_folder_errors(tree, tmp_path, args, code, message):
    result = invoke("train", tree, *args, "--out", tmp_path / "r", "--max-steps", "2", *SHAPE)
    assert result.exit_code == code and message in result.stderr, result.output


def test_include_with_a_single_file_is_refused(tree, tmp_path):
    result = invoke("train", tree / "main.c", "--include", "*.c", "--out", tmp_path / "r", "--max-steps", "2", *SHAPE)
    assert result.exit_code == 2 and "--include selects files of a folder corpus" in result.stderr


def test_exclude_leaves_out_files_and_folders_by_name(tree, tmp_path):
    ids = folder_ids(tree, include=("*.c", "*.h"), exclude=("lib", "util.*"), kind="char", val_fraction=0.1,
                     root=tmp_path / "cache")
    names = [os.path.relpath(p, tree) for p in ids.files["train_paths"] + ids.files["val_paths"]]
    assert names == ["main.c"]
    out = tmp_path / "run"
    result = invoke("train", tree, "--include", "*.c", "--exclude", "deep", "--out", out, "--max-steps", "2", *SHAPE)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "last.safetensors").train_state["exclude"] == ["deep"]


def test_cached_file_lists_are_absolute_and_read_back_from_anywhere(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tree.parent)
    ids = folder_ids(tree.name, include=("*.c",), kind="char", val_fraction=0.1, root=tmp_path / "cache")
    paths = ids.files["train_paths"] + ids.files["val_paths"]
    assert all(os.path.isabs(p) for p in paths) and ids.files["digest"]


def test_the_validation_split_comes_closest_to_the_fraction(tmp_path):
    from charlm.data.folder_corpus import _val_start

    assert _val_start([100] * 10, 0.1) == 9  # one file of ten: exactly the fraction
    assert _val_start([10] * 9 + [1000], 0.1) == 9  # a huge last file: still one file (at least one)
    assert _val_start([100, 100, 100, 5, 5], 0.1) == 3  # 10 bytes (3%) is closer to 31 than 110 (35%)
    assert _val_start([100, 100], 0.9) == 1  # one file is always left for training
    root = tmp_path / "c"
    root.mkdir()
    for name, size in (("a.txt", 4000), ("b.txt", 4000), ("z.txt", 8000)):
        (root / name).write_text("x y\n" * (size // 4), encoding="utf-8")
    result = invoke("train", root, "--out", tmp_path / "r", "--max-steps", "1", *SHAPE)
    assert result.exit_code == 0, result.output
    assert "validating on the last 1 file(s)" in result.stderr and "50.0% of the bytes" in result.stderr


def test_val_file_inside_the_folder_is_not_trained_on_and_a_missing_one_is_refused(tree, tmp_path):
    ids = folder_ids(tree, include=("*.c",), kind="char", val_fraction=0.1, val_path=tree / "main.c",
                     root=tmp_path / "cache")
    assert str((tree / "main.c").resolve()) not in ids.files["train_paths"]
    assert ids.files["val_paths"] == [str((tree / "main.c").resolve())]
    result = invoke("train", tree, "--val-file", tmp_path / "missing.txt", "--out", tmp_path / "r",
                    "--max-steps", "1", *SHAPE)
    assert result.exit_code == 1 and "missing.txt" in result.stderr and "Traceback" not in result.output


def test_include_without_a_corpus_is_refused(tmp_path):
    result = invoke("train", "--include", "*.c", "--out", tmp_path / "r", "--max-steps", "1", *SHAPE)
    assert result.exit_code == 2 and "no corpus was given" in result.stderr, result.output


def test_resume_reads_the_folder_as_the_run_did_and_warns_when_it_changed(tree, tmp_path):
    import charlm

    out = tmp_path / "run"
    charlm.train(tree, include="*.c", encoding_errors="replace", out=out, max_steps=2, hidden_size=16, embed_size=8,
                 seq_len=8, batch_size=2, device="cpu")
    state = load_checkpoint(out / "last.safetensors").train_state
    assert state["include"] == ["*.c"] and state["encoding_errors"] == "replace" and state["corpus_digest"]
    notes = []
    charlm.train(resume=out, max_steps=3, on_note=notes.append)  # through the API: patterns kept
    state = load_checkpoint(out / "last.safetensors").train_state
    assert state["include"] == ["*.c"] and state["encoding_errors"] == "replace"
    assert not any("changed" in n for n in notes) and not any("not UTF-8" in n for n in notes), notes
    (tree / "extra.c").write_text("int extra;\n" * 50, encoding="utf-8")
    changed = invoke("train", "--resume", out, "--max-steps", "4")
    assert changed.exit_code == 0, changed.output
    assert "changed since the run began" in changed.stderr
