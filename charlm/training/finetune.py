"""Fine-tuning's start: another model's weights copied into a fresh model (a grown vocabulary's new
rows keep their initialisation)."""
from __future__ import annotations

import torch

from charlm.errors import CheckpointError
from charlm.model.lm import RNNLM


def load_initial_weights(model: RNNLM, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into ``model``. Where the model's vocabulary is larger (a fine-tune with
    ``--extend-vocab``), the embedding and output rows of the old tokens are copied and the new
    rows keep their fresh initialisation; every other tensor must match exactly."""
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if name not in weights:
                if name == "head.weight" and model.cfg.tie_weights:
                    continue
                raise CheckpointError(f"the model to start from has no tensor {name}")
            source = weights[name]
            grows = name in ("embedding.weight", "head.weight", "head.bias") and source.shape[1:] == target.shape[1:]\
                and source.shape[0] <= target.shape[0]
            if source.shape != target.shape and not grows:
                raise CheckpointError(f"tensor {name} of the model to start from has shape {tuple(source.shape)}, "
                                      f"this run's model needs {tuple(target.shape)}")
            target[: source.shape[0]].copy_(source)
