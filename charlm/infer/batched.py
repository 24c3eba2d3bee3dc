"""Batched generation: many generations stepped together on one ``FastStep``, joining and leaving
between steps.

Each generation keeps its own RNG, stop string and decoders (``sample.Generation``) and draws from
its own rows of the batch's logits, so a seed gives the text ``generate`` gives with it, but for
rounding: its rows are computed beside others', and a matmul's rounding depends on the batch's
size (≤ 4e-7 in the logits, measured), so a rare draw can differ. Argmax (temperature 0) never
does in practice. What runs the batch (a loop here, a server's thread) decides who joins when.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from charlm.config import SampleConfig, brief
from charlm.data.tokenizer import Tokenizer
from charlm.errors import UsageError
from charlm.infer.sample import Generation, Piece, sampling_precision
from charlm.infer.step import FastStep
from charlm.model.lm import RNNLM, has_cell_state


@dataclass
class _Rows:
    """A running generation and its first row in the current batch (-1: not laid out yet)."""

    run: Generation
    offset: int = -1


class BatchedGenerations:
    """Generations stepped together, at most ``max_rows`` sample rows in all. ``add`` and
    ``remove`` between steps; ``step`` draws one token for every running generation."""

    def __init__(self, model: RNNLM, *, max_rows: int, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise UsageError(f"max_rows must be a whole number ≥ 1 (got {brief(max_rows)})")
        self.model = model
        self.max_rows = max_rows
        self.fast = FastStep(model, dtype=dtype)
        self.entries: list[_Rows] = []
        self.changed = False  # generations came or went since the batch was laid out

    @property
    def running(self) -> list[Generation]:
        return [entry.run for entry in self.entries]

    @property
    def rows(self) -> int:
        return sum(entry.run.num_samples for entry in self.entries)

    def fits(self, run: Generation) -> bool:
        """Whether ``run``'s samples fit beside the running ones."""
        return self.rows + run.num_samples <= self.max_rows

    def add(self, run: Generation) -> list[Piece]:
        """Start ``run``: the pieces due before any step. One that is over at once (length 0)
        never joins the batch."""
        if not self.fits(run):
            raise UsageError(f"{run.num_samples} sample(s) do not fit beside the {self.rows} running "
                             f"(at most {self.max_rows} rows)")
        pieces = run.start()
        if not run.finished:
            self.entries.append(_Rows(run))
            self.changed = True
        return pieces

    def remove(self, run: Generation) -> None:
        """Take ``run`` out of the batch (its client left); it is never stepped again."""
        kept = [entry for entry in self.entries if entry.run is not run]
        if len(kept) != len(self.entries):
            self.entries = kept
            self.changed = True

    def clear(self) -> None:
        self.entries = []
        self.changed = True

    @torch.inference_mode()
    def step(self) -> list[tuple[Generation, list[Piece] | Exception]]:
        """One token for every running generation: each one's pieces, or the exception that ended
        it (NaN scores: that generation fails, the others go on). Finished and failed generations
        leave the batch."""
        if not self.entries:
            return []
        if self.changed:
            self._lay_out()
            self.changed = False
        logits = self.fast.step(torch.cat([entry.run.token for entry in self.entries]))
        outcomes: list[tuple[Generation, list[Piece] | Exception]] = []
        for entry in self.entries:
            run = entry.run
            try:
                outcomes.append((run, run.advance(logits[entry.offset:entry.offset + run.num_samples])))
            except Exception as exc:  # noqa: BLE001 - handed to whoever runs this generation
                outcomes.append((run, exc))
        over = {id(run) for run, outcome in outcomes if isinstance(outcome, Exception) or run.finished}
        if over:
            self.entries = [entry for entry in self.entries if id(entry.run) not in over]
            self.changed = True
        return outcomes

    def _lay_out(self) -> None:
        """One batch of the running generations' rows: the states carried from the last batch, a
        new generation's from its prime."""
        cfg = self.model.cfg
        current = self.fast.state() if self.fast.batch_size else None
        parts: list[Any] = []
        offset = 0
        for entry in self.entries:
            rows = entry.run.num_samples
            if entry.offset >= 0 and current is not None:
                kept = slice(entry.offset, entry.offset + rows)
                parts.append(tuple(s[:, kept] for s in current) if isinstance(current, tuple) else current[:, kept])
            elif entry.run.state is not None:
                parts.append(entry.run.state)
            else:
                zeros = torch.zeros(cfg.num_layers, rows, cfg.hidden_size, device=self.fast.device)
                parts.append((zeros, zeros.clone()) if has_cell_state(cfg.cell) else zeros)
            entry.offset = offset
            offset += rows
        if isinstance(parts[0], tuple):
            state: Any = tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0])))
        else:
            state = torch.cat(parts, dim=1)
        self.fast.reset(offset, state)


def generate_batch(model: RNNLM, tokenizer: Tokenizer, requests: Sequence[tuple[str, SampleConfig]], *,
                   precision: str = "auto") -> list[list[str]]:
    """Every request's samples, ``(prime, config)`` each, generated together in one batch: a
    generation that ends (its stop string, <EOS>) leaves it, the others go on. Each request's texts
    are what ``sample.generate`` gives it alone, within the rounding of the module's docstring."""
    device = model.embedding.weight.device
    chosen = sampling_precision(precision, device)
    runs = [Generation(model, tokenizer, config=config, prime=prime) for prime, config in requests]
    texts = [[""] * run.num_samples for run in runs]
    if not runs:
        return []
    index = {id(run): i for i, run in enumerate(runs)}
    batch = BatchedGenerations(model, max_rows=sum(run.num_samples for run in runs), dtype=chosen.dtype)

    def collect(run: Generation, pieces: list[Piece]) -> None:
        for piece in pieces:
            texts[index[id(run)]][piece.stream] += piece.text

    for run in runs:
        collect(run, batch.add(run))
    while batch.entries:
        for run, outcome in batch.step():
            if isinstance(outcome, Exception):
                raise outcome
            collect(run, outcome)
    return texts
