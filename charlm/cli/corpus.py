"""The ``charlm corpus`` commands: list the standard corpora and download one, with its progress shown."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from charlm import jsonio
from charlm.cli.output import console, err, handled
from charlm.data.corpora import get_corpus, list_corpora, prepared_corpus


corpus_app = typer.Typer(help="Download the standard corpora: tinyshakespeare, enwik8, text8, ptb, ptb-char, wikitext-2.",
                         no_args_is_help=True)


class _DownloadDisplay:
    """Renders download progress: a rich bar on a terminal, a few plain lines otherwise."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None

    def __enter__(self) -> "_DownloadDisplay":
        if err.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), console=err, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _say(self, line: str) -> None:
        (self.progress.console if self.progress is not None else err).print(line, markup=False)

    def event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "file":
            self._say(f"charlm: downloading {event['file']} from {event['url']}")
            if self.progress is not None:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(event["file"], total=event["size"])
        elif kind == "resume":
            self._say(f"charlm: resuming at byte {event['offset']:,}")
        elif kind == "restart":
            self._say(f"charlm: warning: starting the file again: {event['reason']}")
        elif kind == "mirror_failed":
            self._say(f"charlm: warning: {event['url']} failed ({event['reason']}); trying the next mirror")
        elif kind == "unverified":
            self._say(f"charlm: warning: {event['file']} has no published checksum, so it could not be "
                      f"verified; its sha256 is {event['sha256']}")

    def update(self, done: int, total: int | None) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done, total=total)


@corpus_app.command("list")
def corpus_list(
    root: Annotated[Path, typer.Option(help="Folder the corpora are kept in.")] = Path("corpora"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """List the corpora charlm can download, their download size, and whether they are ready here.

    Example: charlm corpus list
    """
    with handled():
        rows = []
        for spec in list_corpora():
            ready = prepared_corpus(spec, root)
            rows.append({"name": spec.name, "description": spec.description, "tokenizer": spec.tokenizer,
                         "download_bytes": spec.download_size, "splits": [s.split for s in spec.splits],
                         "prepared": ready is not None, "train": str(ready.train) if ready else None})
        if as_json:
            sys.stdout.write(jsonio.dumps({"root": str(root), "corpora": rows}) + "\n")
            return
        width = max(len(row["name"]) for row in rows)
        console.print(f"{'name':<{width}}  download  splits            tokenizer  ready", markup=False)
        for row in rows:
            size = f"{row['download_bytes'] / 1e6:.1f} MB" if row["download_bytes"] else "?"
            console.print(f"{row['name']:<{width}}  {size:>8}  {'/'.join(row['splits']):<16}  "
                          f"{row['tokenizer']:<9}  {'yes' if row['prepared'] else '-'}", markup=False)
            console.print(f"{'':<{width}}  {row['description']}", markup=False)


@corpus_app.command("get")
def corpus_get(
    name: Annotated[str, typer.Argument(help="A corpus name from 'charlm corpus list'.")],
    root: Annotated[Path, typer.Option(help="Folder the corpora are kept in.")] = Path("corpora"),
    mirror: Annotated[Optional[str], typer.Option(
        envvar="CHARLM_CORPUS_MIRROR",
        help="Fetch every file from MIRROR/NAME/FILE instead of the usual hosts (http://, https:// or file://).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download and split again even if the corpus is ready.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Download a standard corpus, verify its checksum, and write its train/valid/test files.

    Run it again after an interruption: the download resumes where it stopped.

    Example: charlm corpus get tinyshakespeare && charlm train tinyshakespeare
    """
    with handled():
        with _DownloadDisplay() as display:
            result = get_corpus(name, root, base_url=mirror, progress=display.update, on_event=display.event,
                                force=force)
        report = {"name": result.name, "folder": str(result.folder), "downloaded": result.downloaded,
                  "splits": {split: str(path) for split, path in result.splits.items()},
                  "files": [{"name": f.name, "url": f.url, "sha256": f.sha256, "verified_by": f.verified_by}
                            for f in result.files]}
        if as_json:
            sys.stdout.write(jsonio.dumps(report) + "\n")
            return
        if not result.downloaded:
            err.print(f"charlm: {result.name} is already here (--force fetches it again)", markup=False)
        for split, path in result.splits.items():
            console.print(f"{split}: {path} ({path.stat().st_size:,} bytes)", markup=False)
