"""The corpus registry and downloader, against a real HTTP server on 127.0.0.1 (never the internet)."""
from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from charlm.data import corpora
from charlm.data.corpora import CorpusSpec, get_corpus, prepared_corpus, resolve_corpus_name
from charlm.data.corpus_splits import SplitSource
from charlm.data.download import RemoteFile
from charlm.errors import ChecksumError, CorpusError, DownloadError, UsageError

from conftest import SHARED_CORPUS

TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(2000))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# ── a local HTTP server ─────────────────────────────────────────────────────────────────────────

@dataclass
class Server:
    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    range_from_zero: bool = False  # answer a Range request with 206 for the whole file (a broken server)
    truncate_next: int | None = None  # send only this many body bytes on the next answer, then hang up
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state: Server = self.server.state  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        status, start = 200, 0
        if range_header and state.honour_range:
            start = 0 if state.range_from_zero else int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if state.truncate_next is not None:
            payload, state.truncate_next = payload[:state.truncate_next], None
        self.wfile.write(payload)


@pytest.fixture
def server():
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on this machine where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/corpus.txt"


def text_spec(urls: tuple[str, ...], *, name: str = "tiny", sha: str | None = sha256(TEXT),
              md5: str | None = None, size: int | None = len(TEXT)) -> CorpusSpec:
    return CorpusSpec(
        name=name, description="test corpus", tokenizer="char",
        files=(RemoteFile("corpus.txt", urls, size=size, sha256=sha, md5=md5),),
        splits=(SplitSource("train", "corpus.txt", char_fraction=(0.0, 0.9)),
                SplitSource("valid", "corpus.txt", char_fraction=(0.9, 1.0))))


# ── downloading ─────────────────────────────────────────────────────────────────────────────────

def test_download_verifies_splits_and_reports_progress(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    calls, events = [], []
    result = get_corpus(text_spec((server.url("/corpus.txt"),)), tmp_path,
                        progress=lambda done, total: calls.append((done, total)), on_event=events.append)
    assert result.downloaded and result.unverified == ()
    assert result.files[0].verified_by == "sha256" and result.files[0].sha256 == sha256(TEXT)
    cut = int(len(TEXT) * 0.9)
    assert result.train.read_bytes() == TEXT[:cut]
    assert result.valid.read_bytes() == TEXT[cut:]
    assert result.test is None and set(result.splits) == {"train", "valid"}
    assert result.train == tmp_path / "tiny" / "train.txt"
    assert (tmp_path / "tiny" / "download" / "corpus.txt").read_bytes() == TEXT
    assert not list((tmp_path / "tiny").rglob("*.part")) and not list((tmp_path / "tiny").rglob(".*tmp*"))
    manifest = json.loads((tmp_path / "tiny" / "corpus.json").read_text())
    assert manifest["splits"]["train"]["bytes"] == cut
    assert manifest["files"][0]["url"] == server.url("/corpus.txt")
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1] == (len(TEXT), len(TEXT))
    assert [e["event"] for e in events] == ["file", "split", "split"]


def test_second_call_does_not_download_again(server, tmp_path, closed_port_url):
    server.files["/corpus.txt"] = TEXT
    spec = text_spec((server.url("/corpus.txt"),))
    first = get_corpus(spec, tmp_path)
    assert len(server.requests) == 1
    again = get_corpus(spec, tmp_path)
    assert len(server.requests) == 1 and not again.downloaded
    assert again.splits == first.splits and again.files == first.files
    # A lost split is rebuilt from the kept download, without the network.
    first.valid.unlink()
    offline = text_spec((closed_port_url,))
    rebuilt = get_corpus(offline, tmp_path)
    assert rebuilt.valid.read_bytes() == TEXT[int(len(TEXT) * 0.9):] and not rebuilt.downloaded


def test_partial_download_resumes_with_a_range_request(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    download = tmp_path / "tiny" / "download"
    download.mkdir(parents=True)
    (download / "corpus.txt.part").write_bytes(TEXT[:12345])
    events = []
    result = get_corpus(text_spec((server.url("/corpus.txt"),)), tmp_path, on_event=events.append)
    assert server.requests == [("/corpus.txt", "bytes=12345-")]
    assert result.files[0].verified_by == "sha256"
    assert (download / "corpus.txt").read_bytes() == TEXT
    assert {"event": "resume", "url": server.url("/corpus.txt"), "offset": 12345} in events


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    server.honour_range = False
    download = tmp_path / "tiny" / "download"
    download.mkdir(parents=True)
    (download / "corpus.txt.part").write_bytes(b"garbage that must not survive")
    events = []
    get_corpus(text_spec((server.url("/corpus.txt"),)), tmp_path, on_event=events.append)
    assert (download / "corpus.txt").read_bytes() == TEXT
    assert any(e["event"] == "restart" and "ignored the Range" in e["reason"] for e in events)


def test_dropped_connection_keeps_the_part_and_the_next_run_resumes(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    server.truncate_next = 5000
    spec = text_spec((server.url("/corpus.txt"),))
    with pytest.raises(DownloadError, match="connection closed after 5,000 of") as info:
        get_corpus(spec, tmp_path)
    assert "\n" not in str(info.value)
    part = tmp_path / "tiny" / "download" / "corpus.txt.part"
    assert part.read_bytes() == TEXT[:5000]
    result = get_corpus(spec, tmp_path)
    assert server.requests[-1] == ("/corpus.txt", "bytes=5000-")
    assert result.train.read_bytes() + result.valid.read_bytes() == TEXT and not part.exists()


def test_complete_part_answered_416_is_verified_not_refetched(server, tmp_path):
    # A run killed between the last byte and the rename: no size known, so the server is asked.
    server.files["/corpus.txt"] = TEXT
    download = tmp_path / "tiny" / "download"
    download.mkdir(parents=True)
    (download / "corpus.txt.part").write_bytes(TEXT)
    result = get_corpus(text_spec((server.url("/corpus.txt"),), size=None), tmp_path)
    assert server.requests == [("/corpus.txt", f"bytes={len(TEXT)}-")]
    assert result.files[0].verified_by == "sha256"


def test_a_part_longer_than_the_file_starts_again(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    download = tmp_path / "tiny" / "download"
    download.mkdir(parents=True)
    (download / "corpus.txt.part").write_bytes(TEXT + b"extra bytes from some other file")
    events = []
    get_corpus(text_spec((server.url("/corpus.txt"),), size=None), tmp_path, on_event=events.append)
    assert server.requests == [("/corpus.txt", f"bytes={len(TEXT) + 32}-"), ("/corpus.txt", None)]
    assert (download / "corpus.txt").read_bytes() == TEXT
    assert any(e["event"] == "restart" for e in events)


def test_a_partial_answer_for_another_range_is_not_appended(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    server.range_from_zero = True
    download = tmp_path / "tiny" / "download"
    download.mkdir(parents=True)
    (download / "corpus.txt.part").write_bytes(TEXT[:100])
    get_corpus(text_spec((server.url("/corpus.txt"),)), tmp_path)
    assert server.requests == [("/corpus.txt", "bytes=100-"), ("/corpus.txt", None)]
    assert (download / "corpus.txt").read_bytes() == TEXT


def test_checksum_mismatch_is_an_error_and_the_bad_file_is_removed(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    spec = text_spec((server.url("/corpus.txt"),), sha=sha256(b"something else"))
    with pytest.raises(ChecksumError) as info:
        get_corpus(spec, tmp_path)
    message = str(info.value)
    assert sha256(TEXT) in message and sha256(b"something else") in message and "removed" in message
    assert not list((tmp_path / "tiny" / "download").iterdir())
    assert prepared_corpus(spec, tmp_path) is None


def test_md5_verifies_when_no_sha256_is_known(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    good = text_spec((server.url("/corpus.txt"),), sha=None, md5=hashlib.md5(TEXT).hexdigest())
    assert get_corpus(good, tmp_path).files[0].verified_by == "md5"
    bad = text_spec((server.url("/corpus.txt"),), name="tiny2", sha=None, md5="0" * 32)
    with pytest.raises(ChecksumError, match="md5"):
        get_corpus(bad, tmp_path)


def test_unknown_checksum_is_reported_with_the_computed_sha256(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    events = []
    result = get_corpus(text_spec((server.url("/corpus.txt"),), sha=None, size=None), tmp_path,
                        on_event=events.append)
    assert result.unverified == ("corpus.txt",) and result.files[0].verified_by is None
    assert {"event": "unverified", "file": "corpus.txt", "sha256": sha256(TEXT)} in events
    manifest = json.loads((tmp_path / "tiny" / "corpus.json").read_text())
    assert manifest["files"][0] == {"name": "corpus.txt", "url": server.url("/corpus.txt"),
                                    "sha256": sha256(TEXT), "verified_by": None}


def test_zip_is_unpacked_and_split_by_byte_ranges(server, tmp_path):
    data = bytes(range(256)) * 400  # 102,400 bytes, not UTF-8: byte splits must not decode
    archive = make_zip({"pack/data.bin": data, "pack/README": b"ignored"})
    server.files["/pack.zip"] = archive
    spec = CorpusSpec(
        name="bytes", description="", tokenizer="byte",
        files=(RemoteFile("pack.zip", (server.url("/pack.zip"),), size=len(archive), sha256=sha256(archive)),),
        splits=(SplitSource("test", "pack.zip", member="pack/data.bin", byte_range=(95_000, 100_000)),
                SplitSource("train", "pack.zip", member="pack/data.bin", byte_range=(0, 90_000)),
                SplitSource("valid", "pack.zip", member="pack/data.bin", byte_range=(90_000, 95_000))))
    result = get_corpus(spec, tmp_path)
    assert list(result.splits) == ["train", "valid", "test"]
    assert result.train.read_bytes() == data[:90_000]
    assert result.valid.read_bytes() == data[90_000:95_000]
    assert result.test.read_bytes() == data[95_000:100_000]


def test_zip_members_as_whole_split_files(server, tmp_path):
    members = {"wt/wiki.train.raw": b"train text\n" * 50, "wt/wiki.valid.raw": b"valid\n", "wt/wiki.test.raw": b"test\n"}
    archive = make_zip(members)
    server.files["/wt.zip"] = archive
    spec = CorpusSpec(
        name="wt", description="", tokenizer="char",
        files=(RemoteFile("wt.zip", (server.url("/wt.zip"),), sha256=sha256(archive)),),
        splits=tuple(SplitSource(s, "wt.zip", member=f"wt/wiki.{s}.raw") for s in ("train", "valid", "test")))
    result = get_corpus(spec, tmp_path)
    for split in ("train", "valid", "test"):
        assert result.splits[split].read_bytes() == members[f"wt/wiki.{split}.raw"]


def test_a_zip_shorter_than_its_splits_is_an_error(server, tmp_path):
    archive = make_zip({"data": b"x" * 1000})
    server.files["/a.zip"] = archive
    spec = CorpusSpec(
        name="short", description="", tokenizer="byte",
        files=(RemoteFile("a.zip", (server.url("/a.zip"),), sha256=sha256(archive)),),
        splits=(SplitSource("train", "a.zip", member="data", byte_range=(0, 900)),
                SplitSource("valid", "a.zip", member="data", byte_range=(900, 2000))))
    with pytest.raises(CorpusError, match="shorter than expected"):
        get_corpus(spec, tmp_path)
    assert prepared_corpus(spec, tmp_path) is None


def test_a_corrupt_unverified_zip_is_removed(server, tmp_path):
    server.files["/bad.zip"] = b"this is not a zip archive"
    spec = CorpusSpec(
        name="bad", description="", tokenizer="char",
        files=(RemoteFile("bad.zip", (server.url("/bad.zip"),)),),
        splits=(SplitSource("train", "bad.zip", member="x"),))
    with pytest.raises(CorpusError, match="not a readable zip archive"):
        get_corpus(spec, tmp_path)
    assert not (tmp_path / "bad" / "download" / "bad.zip").exists()


def test_character_fractions_never_cut_a_character(server, tmp_path):
    text = "héllo wörld ✓ naïve café\n".encode() * 37
    server.files["/u.txt"] = text
    spec = text_spec((server.url("/u.txt"),), sha=sha256(text), size=len(text))
    result = get_corpus(spec, tmp_path)
    train, valid = result.train.read_bytes(), result.valid.read_bytes()
    assert train + valid == text
    decoded = text.decode()
    assert train.decode() == decoded[:int(len(decoded) * 0.9)]


def test_offline_error_names_the_url_and_what_to_do(tmp_path, closed_port_url):
    with pytest.raises(DownloadError) as info:
        get_corpus(text_spec((closed_port_url,)), tmp_path)
    message = str(info.value)
    assert closed_port_url in message and "connection refused" in message
    assert "check your internet connection" in message and "by hand" in message
    assert str(tmp_path / "tiny" / "download" / "corpus.txt") in message and "\n" not in message


def test_http_error_falls_back_to_the_next_mirror(server, tmp_path):
    server.files["/mirror2/corpus.txt"] = TEXT
    events = []
    result = get_corpus(text_spec((server.url("/gone/corpus.txt"), server.url("/mirror2/corpus.txt"))),
                        tmp_path, on_event=events.append)
    assert result.files[0].url == server.url("/mirror2/corpus.txt")
    assert any(e["event"] == "mirror_failed" and e["reason"].startswith("HTTP 404") for e in events)


def test_http_error_on_every_mirror_is_a_download_error(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/gone/corpus.txt \(HTTP 404"):
        get_corpus(text_spec((server.url("/gone/corpus.txt"),)), tmp_path)


def test_a_file_put_in_place_by_hand_is_verified_and_used(tmp_path, closed_port_url):
    download = tmp_path / "tiny" / "download"
    download.mkdir(parents=True)
    (download / "corpus.txt").write_bytes(TEXT)
    result = get_corpus(text_spec((closed_port_url,)), tmp_path)
    assert result.files[0].url is None and result.files[0].verified_by == "sha256"
    assert result.train.read_bytes() + result.valid.read_bytes() == TEXT


def test_force_downloads_again(server, tmp_path):
    server.files["/corpus.txt"] = TEXT
    spec = text_spec((server.url("/corpus.txt"),))
    get_corpus(spec, tmp_path)
    result = get_corpus(spec, tmp_path, force=True)
    assert len(server.requests) == 2 and result.downloaded


def test_base_url_serves_every_file_of_an_entry(server, tmp_path):
    server.files["/tiny/corpus.txt"] = TEXT
    result = get_corpus(text_spec(("https://example.invalid/never-used.txt",)), tmp_path,
                        base_url=server.url("/"))
    assert server.requests == [("/tiny/corpus.txt", None)]
    assert result.files[0].url == server.url("/tiny/corpus.txt")


def test_file_url_mirror(tmp_path):
    mirror = tmp_path / "mirror" / "tiny"
    mirror.mkdir(parents=True)
    (mirror / "corpus.txt").write_bytes(TEXT)
    result = get_corpus(text_spec(("https://example.invalid/x",)), tmp_path / "out",
                        base_url=(tmp_path / "mirror").as_uri())
    assert result.train.read_bytes() + result.valid.read_bytes() == TEXT


def test_registry_tinyshakespeare_through_a_mirror(server, tmp_path, monkeypatch):
    """The real registry entry (size and sha256 as recorded) against the real file."""
    if not SHARED_CORPUS.is_file():
        pytest.skip("../shared/corpora/tinyshakespeare.txt is not present")
    data = SHARED_CORPUS.read_bytes()
    server.files["/tinyshakespeare/input.txt"] = data
    result = get_corpus("tinyshakespeare", tmp_path, base_url=server.base)
    assert result.files[0].verified_by == "sha256"
    assert result.train.read_bytes() + result.valid.read_bytes() == data
    assert result.valid.stat().st_size == len(data) - int(len(data) * 0.9)
    monkeypatch.chdir(tmp_path)
    assert resolve_corpus_name("tinyshakespeare", root=tmp_path).train == result.train


# ── names and the registry ──────────────────────────────────────────────────────────────────────

def test_resolve_corpus_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_corpus_name("my-notes.txt", root=tmp_path / "corpora") is None
    with pytest.raises(CorpusError, match="run: charlm corpus get enwik8 --root"):
        resolve_corpus_name("enwik8", root=tmp_path / "corpora")
    with pytest.raises(CorpusError, match=r"run: charlm corpus get ptb$"):
        resolve_corpus_name("ptb")
    (tmp_path / "ptb").write_text("a file the user named ptb\n")
    assert resolve_corpus_name("ptb") is None  # a path that exists wins over the registry


def test_unknown_corpus_name_lists_the_available_ones(tmp_path):
    with pytest.raises(UsageError, match="unknown corpus 'enwik9'; available: tinyshakespeare, enwik8"):
        get_corpus("enwik9", tmp_path)


def test_registry_is_well_formed():
    specs = corpora.list_corpora()
    assert {s.name for s in specs} >= {"tinyshakespeare", "enwik8", "text8", "ptb", "ptb-char", "wikitext-2"}
    assert len({s.name for s in specs}) == len(specs)
    for spec in specs:
        assert spec.tokenizer in ("char", "word", "byte") and spec.description
        names = {f.name for f in spec.files}
        for remote in spec.files:
            assert remote.urls and all(u.startswith(("https://", "http://")) for u in remote.urls)
            assert remote.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
            assert remote.md5 is None or re.fullmatch(r"[0-9a-f]{32}", remote.md5)
        splits = [s.split for s in spec.splits]
        assert "train" in splits and len(splits) == len(set(splits)) and set(splits) <= {"train", "valid", "test"}
        assert all(s.file in names for s in spec.splits)
        ranges = sorted(s.byte_range for s in spec.splits if s.byte_range)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert corpora.get_spec("enwik8").splits[0].byte_range == (0, 90_000_000)
    assert corpora.get_spec("text8").splits[2].byte_range == (95_000_000, 100_000_000)


def test_registry_tinyshakespeare_matches_the_shared_copy():
    if not SHARED_CORPUS.is_file():
        pytest.skip("../shared/corpora/tinyshakespeare.txt is not present")
    remote = corpora.get_spec("tinyshakespeare").files[0]
    data = SHARED_CORPUS.read_bytes()
    assert remote.size == len(data) and remote.sha256 == sha256(data)
