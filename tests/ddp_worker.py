"""Run by the distributed tests under torchrun: train a fixed tiny config, optionally stopping after
``--stop-at`` steps as if interrupted, so a resumed run can be compared step by step."""
from __future__ import annotations

import argparse
import os

from charlm.config import ModelConfig, TrainConfig
from charlm.training.distributed import from_env, shutdown
from charlm.data.tokenstore import prepare_corpus
from charlm.training.loop import train

parser = argparse.ArgumentParser()
parser.add_argument("corpus")
parser.add_argument("out")
parser.add_argument("--stop-at", type=int, default=None)
parser.add_argument("--dropout", type=float, default=0.0)
parser.add_argument("--num-layers", type=int, default=1)
args = parser.parse_args()
if os.environ.get("CHARLM_TEST_CONTIGUOUS"):  # every state a recurrent kernel gets must be contiguous
    import contiguity

    contiguity.install_failing()

dist = from_env("cpu")
try:
    _, data = prepare_corpus(args.corpus, val_fraction=0.1)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=32, embed_size=16,
                            dropout=args.dropout, num_layers=args.num_layers)
    train_cfg = TrainConfig(seq_len=16, batch_size=4, lr=1e-2, max_steps=8, eval_every=4, warmup_steps=2,
                            log_every=1, device="cpu")
    calls = 0

    def should_stop() -> str | None:
        global calls
        calls += 1
        return "test" if args.stop_at is not None and calls >= args.stop_at else None

    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=args.out, source=args.corpus,
          should_stop=should_stop, dist=dist)
finally:
    shutdown(dist)
