"""Word-level quality per CPU-minute: charlm's defaults against the PyTorch example's recipe.

    python benchmarks/word_quality.py ../shared/corpora/grimm --minutes 3
    python benchmarks/word_quality.py ../shared/corpora/grimm --minutes 3 --options "--weight-drop 0.3"
    python benchmarks/word_quality.py ../shared/corpora/grimm --minutes 3 --only charlm   # skip the reference

CORPUS is a folder with train.txt, valid.txt and test.txt (one sentence a line). Back to back, on
the same files and the same wall-clock budget (evaluation included, as charlm counts it):

1. ``charlm train train.txt --val-file valid.txt --tokenizer word --max-minutes M`` (plus
   ``--options``), then ``charlm perplexity test.txt`` of its best checkpoint (with the cache
   pointer the run fitted on valid.txt, as a user gets it; the model alone's figure beside it),
   and ``charlm perplexity test.txt --dynamic`` (dynamic evaluation with its defaults, or
   ``--dynamic-options``): the static model, with its cache pointer, adapting, and adapting with
   the cache pointer, side by side;
2. a bare reference loop, written here, with pytorch/examples word_language_model's recipe:
   2×200 LSTM, tied, dropout 0.2, plain SGD at lr 20 divided by 4 whenever an epoch's validation
   loss does not improve, gradient clipping 0.25, BPTT 35, batch 20, uniform(±0.1) init, the
   best-validation weights kept.

Both read the same token ids (the reference uses the vocabulary of charlm's run, so the two
perplexities are over the same tokens and comparable), and both are scored by the same evaluator
(charlm.infer.evaluate: the reference's weights are copied into an identical ``RNNLM``). For scale, the
reference is also scored with a cache pointer fitted the same way (``test_ratio_both_cached``);
``test_ratio`` is charlm as a user runs it against the recipe as published. Writes
``benchmarks/results/word-<corpus>-<minutes>min.json`` (with ``--options``: a sweep file).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_charlm(corpus: Path, minutes: float, options: str, run_dir: Path, dynamic_options: str = "") -> dict:
    command = [sys.executable, "-m", "charlm", "train", str(corpus / "train.txt"), "--val-file",
               str(corpus / "valid.txt"), "--tokenizer", "word", "--max-minutes", str(minutes), "--out",
               str(run_dir), "--sample-length", "0", "--json", *shlex.split(options)]
    started = time.perf_counter()
    train = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    wall = time.perf_counter() - started
    test = json.loads(subprocess.run(
        [sys.executable, "-m", "charlm", "perplexity", str(corpus / "test.txt"), "--checkpoint",
         str(run_dir / "best.safetensors"), "--json"], check=True, capture_output=True, text=True).stdout)
    dynamic_started = time.perf_counter()
    dynamic = json.loads(subprocess.run(
        [sys.executable, "-m", "charlm", "perplexity", str(corpus / "test.txt"), "--checkpoint",
         str(run_dir / "best.safetensors"), "--json", "--dynamic", *shlex.split(dynamic_options)],
        check=True, capture_output=True, text=True).stdout)
    dynamic_seconds = time.perf_counter() - dynamic_started
    start = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "start")
    cache = train.get("cache") or {}
    return {"command": " ".join(["charlm train", *command[4:]]), "valid_perplexity": train["best_val_perplexity"],
            "test_perplexity": test["perplexity"],
            "test_perplexity_without_cache": test.get("perplexity_without_cache") or test["perplexity"],
            "cache": test.get("cache"), "cache_fit_seconds": cache.get("seconds"),
            "valid_perplexity_with_cache": math.exp(cache["val_loss"]) if cache.get("pointer") else None,
            "test_unknown_tokens": test.get("unknown_tokens"),
            # Dynamic evaluation of the same checkpoint, beside the static model and its cache pointer
            "test_perplexity_dynamic": dynamic["perplexity"], "dynamic": dynamic["dynamic"],
            "test_perplexity_dynamic_cache": dynamic.get("dynamic_cache_perplexity"),
            "test_perplexity_static": dynamic["static_perplexity"],
            "test_perplexity_cache": dynamic["cache_perplexity"], "dynamic_seconds": dynamic_seconds,
            "steps": train["steps"], "best_step": train["best_step"], "elapsed_seconds": train["elapsed_seconds"],
            "wall_seconds": wall, "model_config": start["model_config"], "train_config": start["train_config"],
            "num_parameters": train["num_parameters"]}


def run_reference(corpus: Path, minutes: float, tokenizer_from: Path, *, seed: int = 1111) -> dict:
    """The word_language_model recipe as a bare loop (our code), under the same time budget."""
    import numpy as np
    import torch
    from torch import nn

    from charlm.model.checkpoint import load_checkpoint
    from charlm.config import ModelConfig
    from charlm.data.text import read_corpus
    from charlm.infer.evaluate import evaluate
    from charlm.model.lm import RNNLM
    from charlm.infer.pointer import evaluate_with_cache, tune_cache
    from charlm.model.precision import FP32

    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = load_checkpoint(tokenizer_from).tokenizer
    ids = {part: np.asarray(tokenizer.encode(read_corpus(corpus / f"{part}.txt")), dtype=np.int64)
           for part in ("train", "valid", "test")}
    vocab, size, bptt, batch, clip = tokenizer.vocab_size, 200, 35, 20, 0.25

    class Reference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.2)
            self.encoder = nn.Embedding(vocab, size)
            self.rnn = nn.LSTM(size, size, 2, dropout=0.2)
            self.decoder = nn.Linear(size, vocab)
            self.decoder.weight = self.encoder.weight
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)

        def forward(self, x, hidden):
            out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
            return self.decoder(self.drop(out)), hidden

    model = Reference()
    train = torch.from_numpy(ids["train"])
    columns = train[: len(train) // batch * batch].view(batch, -1).t().contiguous()  # (T, batch)

    def as_rnnlm() -> RNNLM:
        lm = RNNLM(ModelConfig(vocab_size=vocab, cell="lstm", embed_size=size, hidden_size=size, num_layers=2,
                               tie_weights=True))
        state = {"embedding.weight": model.encoder.weight, "head.bias": model.decoder.bias,
                 **{f"rnn.{k}": v for k, v in model.rnn.state_dict().items()}}
        lm.load_state_dict({**state, "head.weight": model.encoder.weight})
        return lm.eval()

    def valid_loss() -> float:
        return evaluate(as_rnnlm(), ids["valid"]).nats_per_token

    budget, lr, best, best_state, epochs, steps, evals = minutes * 60, 20.0, math.inf, None, 0, 0, []
    criterion = nn.CrossEntropyLoss()
    out_of_time = False
    while not out_of_time:
        model.train()
        hidden = None
        for i in range(0, columns.size(0) - 1, bptt):
            if time.perf_counter() - started >= budget:
                out_of_time = True
                break
            n = min(bptt, columns.size(0) - 1 - i)
            x, y = columns[i:i + n], columns[i + 1:i + 1 + n]
            hidden = None if hidden is None else tuple(h.detach() for h in hidden)
            model.zero_grad()
            logits, hidden = model(x, hidden)
            loss = criterion(logits.view(-1, vocab), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-lr)
            steps += 1
        else:
            epochs += 1
        loss = valid_loss()
        evals.append((steps, round(loss, 4)))
        if loss < best:
            best, best_state = loss, {k: v.clone() for k, v in model.state_dict().items()}
        elif not out_of_time:
            lr /= 4.0
    elapsed = time.perf_counter() - started
    model.load_state_dict(best_state)
    test = evaluate(as_rnnlm(), ids["test"])
    # For scale, not for the ratio: the same cache pointer as charlm's, fitted the same way to the
    # reference's best weights on the validation text.
    found = tune_cache(as_rnnlm(), ids["valid"], precision=FP32)
    cached = (evaluate_with_cache(as_rnnlm(), ids["test"], found.cache, precision=FP32)[0].perplexity
              if found.cache else test.perplexity)
    return {"recipe": "2x200 LSTM, tied, dropout 0.2, SGD lr 20 /4 on plateau, clip 0.25, bptt 35, batch 20",
            "valid_perplexity": math.exp(best), "test_perplexity": test.perplexity, "epochs": epochs,
            "steps": steps, "elapsed_seconds": elapsed, "evals": evals, "final_lr": lr,
            "test_perplexity_with_charlm_cache": cached, "charlm_cache": found.cache.to_dict() if found.cache else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="a folder with train.txt, valid.txt and test.txt")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--options", default="", help="extra charlm train options: records a sweep point")
    parser.add_argument("--dynamic-options", default="",
                        help="options for 'charlm perplexity --dynamic' (e.g. \"--dynamic-lr 0.002\")")
    parser.add_argument("--only", choices=("charlm", "reference"),
                        help="run one side only (the reference takes the vocabulary of charlm's run with --options)")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="charlm-word-")) / "run"
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                    "torch_threads": None, "minutes": args.minutes, "options": args.options}
    import torch

    result["torch_threads"] = torch.get_num_threads()
    if args.only != "reference":
        result["charlm"] = run_charlm(args.corpus, args.minutes, args.options, run_dir, args.dynamic_options)
        print(json.dumps({"charlm": {k: result["charlm"][k] for k in (
            "valid_perplexity", "test_perplexity", "test_perplexity_without_cache", "cache", "steps", "best_step",
            "test_perplexity_static", "test_perplexity_cache", "test_perplexity_dynamic",
            "test_perplexity_dynamic_cache", "dynamic")}}), flush=True)
    if args.only != "charlm":
        if not (run_dir / "best.safetensors").exists():
            # The vocabulary of the charlm run this would be paired with: the same command, one step.
            subprocess.run([sys.executable, "-m", "charlm", "train", str(args.corpus / "train.txt"), "--val-file",
                            str(args.corpus / "valid.txt"), "--tokenizer", "word", "--max-steps", "1", "--out",
                            str(run_dir), "--sample-length", "0", *shlex.split(args.options)],
                           check=True, capture_output=True)
        result["reference"] = run_reference(args.corpus, args.minutes, run_dir / "best.safetensors")
        print(json.dumps({"reference": {k: result["reference"][k] for k in ("valid_perplexity", "test_perplexity",
                                                                            "test_perplexity_with_charlm_cache",
                                                                            "epochs", "steps")}}), flush=True)
    if "charlm" in result and "reference" in result:
        result["test_ratio"] = result["charlm"]["test_perplexity"] / result["reference"]["test_perplexity"]
        result["valid_ratio"] = result["charlm"]["valid_perplexity"] / result["reference"]["valid_perplexity"]
        # The models alone (neither with a cache), and both with the same cache pointer.
        result["test_ratio_without_cache"] = (result["charlm"]["test_perplexity_without_cache"]
                                              / result["reference"]["test_perplexity"])
        result["test_ratio_both_cached"] = (result["charlm"]["test_perplexity"]
                                            / result["reference"]["test_perplexity_with_charlm_cache"])
        print(json.dumps({key: round(result[key], 4) for key in ("test_ratio", "valid_ratio", "test_ratio_without_cache",
                                                                   "test_ratio_both_cached")}))
    RESULTS.mkdir(exist_ok=True)
    stem = f"word-{args.corpus.resolve().name}-{args.minutes:g}min"
    result["dynamic_options"] = args.dynamic_options
    if args.options or args.only or args.dynamic_options:
        out = RESULTS / f"sweep-{stem}.json"
        sweep = json.loads(out.read_text()) if out.exists() else {"runs": []}
        sweep["runs"] = [r for r in sweep["runs"] if (r.get("options"), r.get("only"), r.get("dynamic_options", ""))
                         != (args.options, args.only, args.dynamic_options)]
        sweep["runs"].append({**result, "only": args.only})
        out.write_text(json.dumps(sweep, indent=1) + "\n")
    else:
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
