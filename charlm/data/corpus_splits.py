"""A downloaded corpus unpacked and split into its ``train``, ``valid`` and ``test`` files: whole
files, zip members, byte ranges (the enwik8/text8 convention) or character fractions of one file."""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from charlm import fsutil
from charlm.data.download import CHUNK_BYTES, Event
from charlm.errors import CorpusError

SPLITS = ("train", "valid", "test")

# What a failed write of a split or the manifest leaves: the earlier files, whole.
NOTHING_CHANGED = "the corpus folder keeps what it had"


@dataclass(frozen=True)
class SplitSource:
    """Where one split comes from: a downloaded file, or a member of a zip archive, or a slice of one.

    ``byte_range`` slices bytes (the enwik8/text8 convention); ``char_fraction`` slices characters
    of the UTF-8 text, so no character is ever cut in two. Neither: the whole file.
    """

    split: str
    file: str
    member: str | None = None
    byte_range: tuple[int, int] | None = None
    char_fraction: tuple[float, float] | None = None


def _open_source(download_dir: Path, source: SplitSource) -> "IO[bytes] | _MemberStream":
    path = download_dir / source.file
    if source.member is None:
        return open(path, "rb")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        path.unlink(missing_ok=True)
        raise CorpusError(f"{path}: not a readable zip archive ({exc}); it was removed, run again to "
                          f"download it afresh") from None
    try:
        member = archive.open(source.member)
    except KeyError:
        names = ", ".join(archive.namelist()[:5])
        archive.close()
        raise CorpusError(f"{path}: has no member {source.member!r} (it holds {names})") from None
    return _MemberStream(archive, member)


class _MemberStream:
    """A zip member that also closes its archive."""

    def __init__(self, archive: zipfile.ZipFile, member: IO[bytes]) -> None:
        self._archive, self._member = archive, member

    def read(self, n: int = -1) -> bytes:
        return self._member.read(n)

    def __enter__(self) -> "_MemberStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._member.close()
        self._archive.close()


def write_splits(sources: tuple[SplitSource, ...], folder: Path, download_dir: Path,
                  emit: Callable[[Event], None]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    # Sources read once each, splits in order of their start, so enwik8 is decompressed one time.
    groups: dict[tuple[str, str | None], list[SplitSource]] = {}
    for source in sources:
        groups.setdefault((source.file, source.member), []).append(source)
    for (file, member), sources in groups.items():
        label = f"{file}:{member}" if member else file
        try:
            with _open_source(download_dir, sources[0]) as stream:
                if any(s.char_fraction is not None for s in sources):
                    _split_by_characters(stream.read(), sources, folder, paths, label)
                else:
                    position = 0
                    for source in sorted(sources, key=lambda s: (s.byte_range or (0, 0))[0]):
                        target = folder / f"{source.split}.txt"
                        if source.byte_range is None:
                            fsutil.atomic_write_chunks(target, _copy(stream, None, label), intact=NOTHING_CHANGED)
                        else:
                            start, end = source.byte_range
                            if start < position:
                                raise CorpusError(f"{label}: split byte ranges overlap")
                            _skip(stream, start - position, label)
                            fsutil.atomic_write_chunks(target, _copy(stream, end - start, label), intact=NOTHING_CHANGED)
                            position = end
                        paths[source.split] = target
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            (download_dir / file).unlink(missing_ok=True)
            raise CorpusError(f"{download_dir / file}: corrupted archive ({exc}); it was removed, "
                              f"run again to download it afresh") from None
        except OSError as exc:
            raise CorpusError(f"cannot read {label}: {exc.strerror or exc}") from None
        for source in sources:
            emit({"event": "split", "split": source.split, "path": str(paths[source.split]),
                  "bytes": paths[source.split].stat().st_size})
    return {split: paths[split] for split in SPLITS if split in paths}


def _split_by_characters(data: bytes, sources: list[SplitSource], folder: Path, paths: dict[str, Path],
                         label: str) -> None:
    # surrogateescape: cut by characters, yet write back exactly the bytes that were read.
    text = data.decode("utf-8", errors="surrogateescape")
    for source in sources:
        if source.char_fraction is None:
            raise CorpusError(f"{label}: cannot mix character fractions with other splits of one file")
        lo, hi = source.char_fraction
        start, end = int(len(text) * lo), int(len(text) * hi)
        target = folder / f"{source.split}.txt"
        fsutil.atomic_write(target, text[start:end].encode("utf-8", errors="surrogateescape"), intact=NOTHING_CHANGED)
        paths[source.split] = target


def _skip(stream: Any, count: int, label: str) -> None:
    """Read and drop ``count`` bytes: a zip member cannot seek without decompressing anyway."""
    remaining = count
    while remaining > 0:
        chunk = stream.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            raise CorpusError(f"{label}: shorter than expected (ended {remaining:,} bytes before a split starts)")
        remaining -= len(chunk)


def _copy(stream: Any, count: int | None, label: str) -> Iterator[bytes]:
    """The next ``count`` bytes of ``stream`` (all of it when None), in chunks."""
    remaining = count
    while remaining is None or remaining > 0:
        chunk = stream.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining))
        if not chunk:
            if remaining:
                raise CorpusError(f"{label}: shorter than expected ({remaining:,} bytes missing)")
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk
