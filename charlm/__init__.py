"""charlm: train recurrent language models on a text file, sample from them, and score text.

    import charlm
    lm = charlm.load("checkpoints/tinyshakespeare")
    print("".join(lm.generate("ROMEO:", length=200, seed=1)))
    run = charlm.train("corpus.txt", max_minutes=3)

The names below are loaded on first use, so ``import charlm`` (and ``charlm --help``) stays fast.
"""
from __future__ import annotations

from typing import Any

__version__ = "1.0.0"
__all__ = ["LanguageModel", "Perplexity", "TrainOptions", "TrainResult", "load", "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "TrainOptions":  # the training options' declaration: no torch
        from charlm.training import options

        return options.TrainOptions
    if name in ("LanguageModel", "Perplexity", "load", "train", "TrainResult"):
        from charlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")
