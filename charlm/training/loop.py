"""The training loop. It never prints: progress goes to an ``on_event`` callback (and metrics.jsonl).

Truncated BPTT over B contiguous streams (see ``data/text.py``), hidden state carried across
windows and detached, periodic evaluation of the whole validation split, best/last checkpoints,
exact resume. The step itself is ``step.py``'s, the schedule and optimisers ``optim.py``'s.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from charlm.config import ModelConfig, TrainConfig
from charlm.data.text import PreparedData, fit_batch_shape
from charlm.errors import ConfigError, TrainingError, out_of_memory_as
from charlm.infer.evaluate import EvalResult, evaluate
from charlm.model import checkpoint as ckpt
from charlm.model.lm import RNNLM, State, count_parameters, resolve_device, select_state
from charlm.model.precision import FP32, resolve_precision, tf32_region
from charlm.training.averaging import WeightAverage
from charlm.training.budget import TimeBudget, probe_eval_seconds
from charlm.training.cachefit import cache_allowance, cache_event, fit_cache, plan_cache_fit
from charlm.training.distributed import Dist, device_for
from charlm.training.finetune import load_initial_weights
from charlm.training.memory import check_memory, keep_freed_memory
from charlm.training.optim import fused_is_faster, lr_at, make_optimizer, set_lr
from charlm.training.progress import Progress
from charlm.training.resume import limit_reached
from charlm.training.resume_state import (Resume, gather_resume_state, remove_old_resume_files, restore_resume_tensors,
                                          resume_tensors, write_resume_file)
from charlm.training.rundir import append_metric, claim_run_dir
from charlm.training.streams import TrainingStreams
from charlm.training.step import (Gradients, compute_gradients, keeps_steps_on_device, make_scaler, step_on_device,
                                  step_on_host)
from charlm.training.tally import StepTally

Event = dict[str, Any]


@dataclass(frozen=True)
class TrainResult:
    """What a run ended with. Losses are nats/token on the validation split; the best is the
    run's own, from before a resume too."""

    run_dir: Path
    step: int
    best_val_loss: float
    best_step: int
    last_val_loss: float
    stopped_by: str  # "done", "time", "early-stop", "interrupt"
    elapsed_seconds: float
    num_parameters: int
    best_val_bpc: float = float("nan")  # bits per character of the validation text
    eval_seconds: float = 0.0  # of this session's time, spent evaluating (and saving checkpoints)
    cache: Any = None  # pointer.CacheSearch: the cache pointer fitted at the end (None if not fitted)
    cache_seconds: float = 0.0  # of elapsed_seconds, spent fitting it (loading and storing included)

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / ckpt.BEST


def train(*, model_config: ModelConfig, train_config: TrainConfig, data: PreparedData, run_dir: str | Path,
          source: str = "", on_event: Callable[[Event], None] | None = None,
          should_stop: Callable[[], str | None] | None = None, resume: Resume | None = None,
          dist: Dist | None = None, val_source: str | None = None,
          init_weights: dict[str, torch.Tensor] | None = None,
          corpus_options: dict[str, Any] | None = None, precision_reason: str | None = None,
          sizing: dict[str, Any] | None = None) -> TrainResult:
    """Train a model and write checkpoints and metrics.jsonl into ``run_dir``.

    ``should_stop`` is polled after every step; a non-empty answer (e.g. "SIGINT") ends the run
    after saving ``last``. Returns what happened; raises ``TrainingError`` if the loss stays
    non-finite for ``max_bad_steps`` steps in a row (the last good checkpoint is kept).

    With ``dist`` (a torchrun world) each rank trains its own slice of the B streams under DDP;
    rank 0 alone writes files and reports events, and every stop decision is taken from values
    reduced across ranks, so all ranks stop at the same step.

    ``corpus_options`` (how the corpus was read: ``encoding_errors``, a folder corpus's
    ``include``/``exclude`` patterns and the digest of its split) are kept in the checkpoint for
    ``--resume``. ``init_weights`` (fine-tuning) starts from another model's tensors instead of a random
    initialisation; a vocabulary that grew keeps the old rows and initialises only the new ones.
    ``precision_reason`` says why ``train_config.precision`` (the start event reports it), and
    ``sizing`` what was measured to size the model (``sizing.Sized.to_dict``; the start event too).
    """
    if train_config.max_steps is None and train_config.epochs is None and train_config.max_minutes is None:
        raise ConfigError("give a stopping rule (max_steps, epochs or max_minutes): without one training never "
                          "ends (charlm.train and the CLI default to 3 minutes)")
    dist = dist or Dist()
    run_dir = Path(run_dir)
    with claim_run_dir(run_dir, dist), tf32_region(resolve_device(train_config.device), train_config.tf32):
        return _Run(model_config=model_config, train_config=train_config, data=data, run_dir=run_dir,
                    source=source, on_event=on_event, should_stop=should_stop, resume=resume, dist=dist,
                    val_source=val_source, init_weights=init_weights,
                    corpus_options=corpus_options or {}, precision_reason=precision_reason,
                    sizing=sizing).run()


class _Run:
    """One training session: ``__init__`` sets everything up, ``run`` is the loop, and each of its
    phases (``start``, ``stop_before_step``, ``train_step``, ``log_step``, ``evaluate_and_save``,
    ``save_last``, ``finish``) follows it in that order and reads on its own."""

    def __init__(self, *, model_config: ModelConfig, train_config: TrainConfig, data: PreparedData, run_dir: Path,
                 source: str, on_event: Callable[[Event], None] | None, should_stop: Callable[[], str | None] | None,
                 resume: Resume | None, dist: Dist, val_source: str | None,
                 init_weights: dict[str, torch.Tensor] | None, corpus_options: dict[str, Any],
                 precision_reason: str | None = None, sizing: dict[str, Any] | None = None) -> None:
        self.sizing = sizing
        self.dist, self.data, self.run_dir, self.resume = dist, data, run_dir, resume
        self.source, self.val_source, self.corpus_options = source, val_source, corpus_options
        self.should_stop = should_stop
        self.device = device_for(dist, resolve_device(train_config.device))
        self.emit = (on_event or (lambda event: None)) if dist.is_main else (lambda event: None)
        self.cfg = cfg = self._settle_config(train_config, model_config, precision_reason)
        check_memory(model_config, cfg, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(cfg.seed)
        self.model, self.optimizer = self._build_model(model_config, init_weights)
        if dist.enabled:
            # Different dropout masks on different streams. Seeded before a resume restores each
            # rank's own RNG state, so a resumed run draws the masks an uninterrupted one would.
            torch.manual_seed(cfg.seed + dist.rank)
        self.streams = TrainingStreams(data.train_ids, cfg, dist, self.device)
        self.steps_per_epoch = self.streams.steps_per_epoch
        planned = [s for s in (cfg.max_steps, cfg.epochs * self.steps_per_epoch if cfg.epochs else None) if s]
        self.fixed_total = min(planned) if planned else None
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes else None

        self.progress = Progress(total_steps=self.fixed_total or 10**9,
                                 warmup_steps=min(cfg.warmup_steps, max(1, (self.fixed_total or 10**9) // 10)))
        self.state: State | None = None  # the hidden state carried from window to window (this rank's streams)
        self.average: WeightAverage | None = None  # --average's: what the run evaluates and saves
        if resume is not None:
            self._restore(resume)
        elif cfg.average:
            self.average = WeightAverage(self.model.parameters(), cfg.average_power)
        if dist.enabled:
            # DDP averages gradients over ranks: each rank's mean loss over B/W streams, averaged,
            # is the mean over all B streams, so the step equals a one-process step with batch B.
            self.net: torch.nn.Module = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.net = self.model
        self.num_parameters = self.model.num_parameters()
        self.elapsed_before = self.progress.elapsed_seconds
        self.start_time = time.perf_counter()
        self.clock = self.local_elapsed()  # the run's clock: the ranks' mean, so every rank reads the same time

        self.step_hint = (f"make --batch-size ({cfg.batch_size}) or --seq-len ({cfg.seq_len}) smaller, "
                          f"or the model (--hidden-size, --num-layers)")
        self.grad_norm = torch.tensor(math.nan)  # the last step's, before clipping
        self.tally = StepTally(self.device, self.clock)
        # Ten evaluations a run limited by steps or epochs; under a time budget, as TimeBudget.eval_period says.
        self.eval_every = cfg.eval_every if cfg.eval_every is not None else (
            None if self.budget else max(1, (self.fixed_total or self.steps_per_epoch) // 10))
        self.eval_seconds_total = 0.0
        self.timing = TimeBudget(self.budget, len(data.val_ids), cfg.batch_size * cfg.seq_len,
                                 session_start=(self.progress.step, self.clock), last_eval_at=self.clock,
                                 last_eval_step=self.progress.step if resume is not None else -1)
        self.fit_cost, self.cache_search, self.cache_seconds = None, None, 0.0  # the cache pointer fit's

    def _settle_config(self, cfg: TrainConfig, model_config: ModelConfig, precision_reason: str | None) -> TrainConfig:
        """The configuration this session runs: the batch shape fitted to a short text (refused on
        resume), the precision resolved for the device; sets the precision, the loss scaler and
        whether steps stay on the device."""
        shape = fit_batch_shape(len(self.data.train_ids), cfg.batch_size, cfg.seq_len)
        if shape.warning and self.resume is not None:
            raise ConfigError(f"the training text is too short for the resumed run's --batch-size {cfg.batch_size} "
                              f"and --seq-len {cfg.seq_len} ({len(self.data.train_ids):,} tokens); resume on the "
                              f"run's corpus")
        if shape.warning:
            self.emit({"event": "warning", "message": shape.warning})
            cfg = cfg.replace(batch_size=shape.batch_size, seq_len=shape.seq_len)
        self.precision = resolve_precision(cfg.precision, self.device, cell=model_config.cell)
        if precision_reason:
            self.precision = dataclasses.replace(self.precision, reason=precision_reason)
        cfg = cfg.replace(precision=self.precision.name)  # the checkpoint says what ran
        self.scaler = make_scaler(self.precision, self.device)
        self.device_side = keeps_steps_on_device(self.device, self.dist, cfg)
        return cfg

    def _build_model(self, model_config: ModelConfig,
                     init_weights: dict[str, torch.Tensor] | None) -> tuple[RNNLM, torch.optim.Optimizer]:
        """The model (random, or from ``init_weights``) on the device, and its optimizer."""
        cfg, dist = self.cfg, self.dist
        with out_of_memory_as(f"building a model of {count_parameters(model_config):,} parameters",
                              "make --hidden-size, --num-layers or --embed-size smaller"):
            model = RNNLM(model_config)
            if init_weights is not None:
                load_initial_weights(model, init_weights)
            model.to(self.device)
            fused = True if self.device_side else None
            if fused is None and dist.enabled and self.device.type == "cpu":
                # Every rank steps the same way (rank 0 measured which is faster), so their weights stay equal.
                fused = dist.broadcast_object(cfg.optimizer in ("adamw", "sgd") and fused_is_faster(cfg.optimizer)
                                              if dist.is_main else None)
            return model, make_optimizer(model, cfg, self.device, fused=fused)

    def _restore(self, resume: Resume) -> None:
        st = resume.checkpoint.train_state
        self.model.load_state_dict(resume.checkpoint.model.state_dict())
        if self.cfg.average:  # the checkpoint holds the average; training goes on from raw.* (restored below)
            self.average = WeightAverage(self.model.parameters(), self.cfg.average_power,
                                         total=float(st["average_total"]))
        self.progress = Progress.from_state(st, warmup_steps=self.progress.warmup_steps,
                                            total_steps=self.progress.total_steps)
        self.progress.stopped_by, self.progress.optim_file = None, None
        if self.fixed_total:
            self.progress.total_steps = self.fixed_total
        self.state = restore_resume_tensors(self.optimizer, self.model, resume.optim_tensors, self.device, self.dist,
                                            self.cfg.optimizer)
        if self.state is not None:
            self.state = select_state(self.state, self.streams.rows)  # the saved state covers all B streams
        p = self.progress
        if (reached := limit_reached(self.cfg, resume.checkpoint.train_config, st, step=p.step, epoch=p.epoch,
                                     elapsed=p.elapsed_seconds, fixed_total=self.fixed_total)) is not None:
            raise ConfigError(f"the run in {self.run_dir} has already reached {reached}; give a larger limit to "
                              f"train it further (limits count the whole run, what is done included)")

    # ── the loop, and its phases in the order they come ──

    def run(self) -> TrainResult:
        """Step, log, and evaluate when due, until a limit, an early stop or a stop request ends the run."""
        self.start()
        stopped_by = "done"
        while (ended := self.stop_before_step()) is None:
            _, lr, reason = self.train_step()
            self.reschedule()
            self.log_step(lr)
            if self.evaluation_due():
                seconds = self.evaluate_and_save()
                self.eval_seconds_total += seconds
                self.clock = self.tally.start = self.clock + seconds
                self.timing.evaluated(self.progress.step, seconds, self.clock)
                if self.cfg.patience is not None and self.progress.evals_since_best >= self.cfg.patience:
                    stopped_by = "early-stop"
                    break
            if reason:
                stopped_by = "interrupt"
                self.save_last()
                self.record({"event": "interrupt", "step": self.progress.step, "reason": reason})
                break
        else:
            stopped_by = ended
        return self.finish(stopped_by)

    def start(self) -> None:
        """Announce the run, and under a time budget measure what its end will cost."""
        cfg, p = self.cfg, self.progress
        self.record({"event": "start", "step": p.step, "total_steps": self.fixed_total,
                     "max_minutes": cfg.max_minutes, "steps_per_epoch": self.steps_per_epoch,
                     "num_parameters": self.num_parameters, "device": str(self.device),
                     "world_size": self.dist.world_size, "model_config": self.model.cfg.to_dict(),
                     "train_config": cfg.to_dict(), "resumed": self.resume is not None,
                     "train_tokens": int(len(self.data.train_ids)), "val_tokens": int(len(self.data.val_ids)),
                     "tokenizer": self.data.tokenizer.kind, "precision": self.precision.name,
                     "precision_reason": self.precision.reason,
                     **({"sizing": self.sizing} if self.sizing else {})})
        self.net.train()
        if self.budget is not None and cfg.cache:
            self.fit_cost, self.timing.fit_reserve = plan_cache_fit(self.model, self.data.val_ids, self.dist,
                                                                    self.budget)
        if self.budget is not None:
            self.timing.eval_probe = probe_eval_seconds(self.model, self.data.val_ids, self.dist)

    def stop_before_step(self) -> str | None:
        """Whether the run is over before the next step: "done", "time", or None (go on). A new
        epoch starts here (and resets the carried state)."""
        p = self.progress
        if self.fixed_total is not None and p.step >= self.fixed_total:
            return "done"
        if self.budget is not None and self.clock + self.timing.end_reserve(p.step, self.clock) >= self.budget:
            return "time"
        if p.window >= self.steps_per_epoch:
            p.epoch, p.window, self.state = p.epoch + 1, 0, None
            if self.cfg.epochs is not None and p.epoch >= self.cfg.epochs:
                return "done"
        return None

    def train_step(self) -> tuple[float, float, str | None]:
        """One window forward and backward, then the optimizer step if everything was finite.
        Returns (the loss, averaged over ranks, or NaN where it stays on the device; the learning
        rate; a stop request)."""
        cfg, dist, p = self.cfg, self.dist, self.progress
        x, y = self.streams.window(p.epoch, p.window)
        lr = lr_at(p.step, base_lr=cfg.lr, warmup_steps=p.warmup_steps, total_steps=p.total_steps,
                   min_lr_ratio=cfg.min_lr_ratio)
        set_lr(self.optimizer, lr)
        with out_of_memory_as(f"in training step {p.step + 1:,}", self.step_hint), dist.guard():
            gradients = compute_gradients(self.net, self.optimizer, x, y, self.state, config=cfg,
                                          precision=self.precision, scaler=self.scaler)
        self.grad_norm = gradients.grad_norm
        reason = self.should_stop() if self.should_stop else None
        if self.device_side:  # a bad step is skipped by the fused optimizer and its state reset
            loss_value, self.clock = math.nan, self.local_elapsed()
            ok, self.state = step_on_device(self.optimizer, gradients)
            self.tally.on_device(ok, gradients.loss)
        else:
            if dist.enabled:  # one small collective a step: the mean loss, the clock and stop requests
                shared = dist.all_reduce_sum(torch.tensor(
                    [float(gradients.loss), self.local_elapsed(), 1.0 if reason else 0.0], dtype=torch.float64))
                loss_value, self.clock = float(shared[0]) / dist.world_size, float(shared[1]) / dist.world_size
                reason = reason or ("stopped by another process" if shared[2] > 0 else None)
            else:
                loss_value, self.clock = float(gradients.loss.item()), self.local_elapsed()
            self._step_on_host(gradients, loss_value)
        p.step += 1
        p.window += 1
        p.tokens_seen += x.numel() * dist.world_size
        self.tally.tokens += x.numel() * dist.world_size
        return loss_value, lr, reason

    def _step_on_host(self, gradients: Gradients, loss_value: float) -> None:
        """The rest of a step, decided on the host: the optimizer step if the loss and the gradients
        are finite, else a bad step (skipped, the carried state dropped)."""
        if step_on_host(self.optimizer, gradients, loss_value, scaler=self.scaler):
            if self.average is not None:
                self.average.update(self.progress.step + 1)
            self.state = gradients.state
            self.tally.good(loss_value)
        else:
            self.tally.bad()
            self.state = None  # a non-finite state would poison every later window
            self.record({"event": "bad_step", "step": self.progress.step, "loss": loss_value,
                         "consecutive": self.tally.bad_steps})
            if self.tally.bad_steps >= self.cfg.max_bad_steps:
                raise self.too_many_bad_steps()

    def too_many_bad_steps(self) -> TrainingError:
        return TrainingError(f"the loss or gradients were NaN/Inf for {self.tally.bad_steps} steps in a row at step "
                             f"{self.progress.step}; stopped. The last good checkpoint in {self.run_dir} is kept; "
                             f"try a lower --lr or --clip")

    def reschedule(self) -> None:
        """Under a time budget alone: the schedule's length re-estimated from the speed so far,
        every ten steps once warm-up and twenty steps are done."""
        p = self.progress
        if self.budget is not None and self.fixed_total is None and p.step >= max(p.warmup_steps, 20) \
                and p.step % 10 == 0:
            p.total_steps = self.timing.total_steps(p.step, self.clock)

    def log_step(self, lr: float) -> None:
        """Every ``log_every`` steps: the mean training loss since the last record, and the speed."""
        p = self.progress
        if p.step % self.cfg.log_every:
            return
        tally = self.tally
        if self.device_side:  # what the steps since the last read left there, recorded as on the host
            tally.read_device()
            if tally.bad_steps:
                self.record({"event": "bad_step", "step": p.step, "loss": None, "consecutive": tally.bad_steps})
            if tally.bad_steps >= self.cfg.max_bad_steps:
                raise self.too_many_bad_steps()
        if tally.count:
            self.record({"event": "step", "step": p.step, "epoch": p.epoch, "loss": tally.loss_sum / tally.count,
                         "lr": lr, "grad_norm": float(self.grad_norm),
                         "tokens_per_second": tally.tokens_per_second(self.clock), "elapsed": self.clock,
                         "total_steps": p.total_steps if (self.fixed_total or self.budget) else None})
            tally.restart(self.clock)

    def evaluation_due(self) -> bool:
        """Every ``eval_every`` steps, or under a time budget once ``TimeBudget.eval_period`` has passed."""
        step = self.progress.step
        if self.eval_every is not None:
            return step % self.eval_every == 0
        return self.budget is not None and self.timing.evaluation_due(step, self.clock)

    def evaluate_and_save(self) -> float:
        """Evaluate the whole validation split, keep best (if better) and last; the seconds it took."""
        p, dist, data = self.progress, self.dist, self.data
        t0 = time.perf_counter()
        with out_of_memory_as(f"evaluating at step {p.step:,}", "make --hidden-size or --num-layers smaller"):
            # fp32 whatever the training precision: the figure a run reports is the one `charlm
            # perplexity` reproduces and runs on other machines are compared by (bf16 would be
            # within 2e-3 nats/token: tests/test_precision.py).
            with self.averaged():
                result = evaluate(self.model, data.val_ids, precision=FP32, dist=dist)
                p.val_loss = result.nats_per_token
                improved = p.val_loss < p.best_val_loss
                if improved:
                    p.best_val_loss, p.best_step, p.evals_since_best = p.val_loss, p.step, 0
                    with dist.main_outcome():
                        if dist.is_main:
                            self.check_weights()
                            ckpt.save_checkpoint(self.run_dir / ckpt.BEST, model=self.model,
                                                 tokenizer=data.tokenizer, train_config=self.cfg,
                                                 train_state=self.train_state())
        if not improved:
            p.evals_since_best += 1
        self.save_last()
        seconds = float(dist.all_reduce_sum(torch.tensor([time.perf_counter() - t0], dtype=torch.float64))[0])
        seconds /= dist.world_size
        # The run's best so far (an earlier session's, when resumed) on the same split, in bits/char too.
        best = EvalResult(p.best_val_loss * result.num_predicted, result.num_predicted)
        self.record({"event": "eval", "step": p.step, "epoch": p.epoch, "val_loss": p.val_loss,
                     "best_val_loss": p.best_val_loss, "val_bpc": result.bits_per_char(data.val_chars),
                     "improved": improved, "best_step": p.best_step,
                     "best_val_bpc": best.bits_per_char(data.val_chars), "eval_seconds": seconds,
                     "elapsed": self.clock})
        return seconds

    def save_last(self) -> None:
        """last.safetensors and its resume file (every rank takes part: the saved hidden state is
        all B streams and every rank's RNG state, gathered in rank order)."""
        full_state, rng_states, cuda_rng_states = gather_resume_state(self.dist, self.state, self.device)
        with self.dist.main_outcome():
            if self.dist.is_main:
                self.check_weights()
                tensors = resume_tensors(self.optimizer, self.model, full_state, rng_states,
                                         averaged=self.average is not None, cuda_rng_states=cuda_rng_states)
                self.progress.optim_file = write_resume_file(self.run_dir, self.progress.step, tensors)
                with self.averaged():
                    ckpt.save_checkpoint(self.run_dir / ckpt.LAST, model=self.model, tokenizer=self.data.tokenizer,
                                         train_config=self.cfg, train_state=self.train_state())
                remove_old_resume_files(self.run_dir, keep=self.progress.optim_file)

    def finish(self, stopped_by: str) -> TrainResult:
        """The end of a run that was not interrupted: the final evaluation (unless the last step had
        one) and the last checkpoint, then the cache pointer fit; the end event and the result."""
        p = self.progress
        if stopped_by != "interrupt":
            p.stopped_by = stopped_by  # saved with the last checkpoint: a resume can tell what ended the run
            if self.timing.last_eval_step != p.step:
                seconds = self.evaluate_and_save()
                self.clock += seconds
                self.eval_seconds_total += seconds
            else:
                self.save_last()
        if stopped_by != "interrupt" and self.cfg.cache and math.isfinite(p.best_val_loss):
            self.end_with_cache_fit()
        self.record({"event": "end", "step": p.step, "stopped_by": stopped_by, "best_val_loss": p.best_val_loss,
                     "best_step": p.best_step, "elapsed": self.clock, "eval_seconds": self.eval_seconds_total,
                     "cache_seconds": self.cache_seconds})
        predicted = max(len(self.data.val_ids) - 1, 0)
        best_bpc = EvalResult(p.best_val_loss * predicted, predicted).bits_per_char(self.data.val_chars)
        return TrainResult(self.run_dir, p.step, p.best_val_loss, p.best_step, p.val_loss, stopped_by, self.clock,
                           self.num_parameters, best_bpc, self.eval_seconds_total, self.cache_search,
                           self.cache_seconds)

    def end_with_cache_fit(self) -> None:
        """Fit the cache pointer (rank 0), record what came of it, and add its time to the run's clock."""
        allowance = cache_allowance(self.budget, self.clock)
        with self.dist.main_outcome():
            found, seconds = fit_cache(self.run_dir, self.device, self.data.val_ids, allowance,
                                       should_stop=self.should_stop, cost=self.fit_cost, emit=self.emit,
                                       clock=self.clock) if self.dist.is_main else (None, 0.0)
        self.cache_seconds = float(self.dist.broadcast_object(seconds))
        self.clock += self.cache_seconds
        self.cache_search = found if found is not None and found.skipped is None else None
        self.record(cache_event(found, allowance))  # rank 0's; record() writes and reports on rank 0 only

    # ── bookkeeping ──

    def local_elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def record(self, event: Event) -> None:
        """Append an event to metrics.jsonl (rank 0) and hand it to ``on_event``."""
        with self.dist.main_outcome():
            if not self.dist.is_main:
                return
            append_metric(self.run_dir, event)
            self.emit(event)

    def train_state(self) -> dict[str, Any]:
        p = self.progress
        return {"step": p.step, "epoch": p.epoch, "window": p.window, "best_val_loss": p.best_val_loss,
                "best_step": p.best_step, "evals_since_best": p.evals_since_best, "total_steps": p.total_steps,
                "warmup_steps": p.warmup_steps, "elapsed_seconds": self.clock, "tokens_seen": p.tokens_seen,
                "val_loss": p.val_loss, "corpus": self.source, "val_corpus": self.val_source,
                "optim_file": p.optim_file, "num_parameters": self.num_parameters,
                "world_size": self.dist.world_size, "stopped_by": p.stopped_by,
                **({"average_total": self.average.total} if self.average is not None else {}),
                **{key: list(value) if isinstance(value, (list, tuple)) else value
                   for key, value in self.corpus_options.items() if value}}

    def averaged(self):
        """A block in which the model holds the weights the run reports: their average with
        ``--average``, else the weights themselves."""
        return self.average.swapped_in() if self.average is not None else nullcontext()

    def check_weights(self) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise TrainingError("the weights became NaN/Inf; the last good checkpoint is kept")

