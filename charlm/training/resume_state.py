"""The resume file: what ``--resume`` needs besides the weights (optimizer moments, every rank's RNG
state, the carried hidden state, an averaged run's training weights), its checks, and its restore."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.config import ModelConfig, brief
from charlm.errors import CheckpointError
from charlm.model import checkpoint as ckpt
from charlm.model.lm import RNNLM, State, has_cell_state, parameter_shapes
from charlm.training.distributed import Dist


def _is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def _state_tensors(state) -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    if isinstance(state, tuple):
        return {"hidden.h": state[0], "hidden.c": state[1]}
    return {"hidden.h": state}


def resume_tensors(optimizer: torch.optim.Optimizer, model: RNNLM, state, rng_states: torch.Tensor,
                   averaged: bool = False, cuda_rng_states: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What ``--resume`` needs besides the weights. ``rng_states`` is every rank's CPU RNG state
    (one row per rank), and ``cuda_rng_states`` every rank's CUDA one on a GPU run, so each rank of a
    resumed distributed run draws its own dropout masks again.
    ``averaged``: the checkpoint holds the run's average weights, so the weights training goes on
    from are kept here (``raw.<name>``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    if averaged:
        tensors.update({f"raw.{name}": p.detach().float().clone() for name, p in model.named_parameters()})
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).float()
    tensors["rng.cpu"] = rng_states[0].clone()  # safetensors stores no two views of one buffer
    if len(rng_states) > 1:
        tensors["rng.cpu.ranks"] = rng_states
    if cuda_rng_states is not None:
        tensors["rng.cuda"] = cuda_rng_states[0].clone()
        if len(cuda_rng_states) > 1:
            tensors["rng.cuda.ranks"] = cuda_rng_states
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors.update(_state_tensors(state))
    return tensors


def gather_resume_state(dist: Dist, state: State | None,
                        device: torch.device) -> tuple[State | None, torch.Tensor, torch.Tensor | None]:
    """What every rank contributes to the resume file, gathered in rank order (all ranks take part):
    the hidden state of all B streams, every rank's CPU RNG state, and on a GPU its CUDA one."""
    full_state = None
    if state is not None:
        parts = state if isinstance(state, tuple) else (state,)
        gathered = tuple(dist.all_gather_cat(p, dim=1) for p in parts)
        full_state = gathered if isinstance(state, tuple) else gathered[0]
    # Through the run's device, which NCCL needs; a world of one gets its own state back.
    rng_states = dist.all_gather_cat(torch.get_rng_state()[None].to(device), dim=0).cpu()
    cuda_rng_states = None
    if device.type == "cuda":  # each GPU's own generator draws its own masks
        cuda_rng_states = dist.all_gather_cat(torch.cuda.get_rng_state(device)[None].to(device), dim=0).cpu()
    return full_state, rng_states, cuda_rng_states


def write_resume_file(run_dir: Path, step: int, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` (``resume_tensors``) to a resume file named by ``step``; its name. It is
    written before the checkpoint that names it, so last.safetensors always names a resume file that
    exists, whatever moment a crash hits."""
    name = f"last.step{step:09d}.optim.safetensors"
    ckpt.save_tensors(run_dir / name, tensors, {"format": ckpt.FORMAT, "step": str(step)})
    return name


def remove_old_resume_files(run_dir: Path, keep: str) -> None:
    """Delete the resume files of earlier steps once the checkpoint names ``keep``."""
    for old in run_dir.glob("last.step*.optim.safetensors"):
        if old.name != keep:
            old.unlink(missing_ok=True)


# Each optimizer's per-parameter state besides ``step``, and which of it can never be negative.
_MOMENTS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": (), "adagrad": ("sum",), "rmsprop": ("square_avg",)}
_NON_NEGATIVE = ("exp_avg_sq", "sum", "square_avg")


def check_optim_tensors(path: Path, tensors: dict[str, torch.Tensor], model_config: ModelConfig,
                        batch_size: int, steps_taken: int | None = None, optimizer: str = "adamw",
                        averaged: bool = False) -> None:
    """Check a resume file against the model before anything is restored: every parameter has a
    step and the optimizer's moments, of its own shape (or no parameter has any: no step was taken;
    plain SGD keeps none), the RNG state has the generator's size, and the hidden state is
    (layers, batch, hidden) for the cell. An ``averaged`` run's file holds every parameter's
    training weights (``raw.<name>``), finite and of its shape."""
    shapes = parameter_shapes(model_config)
    if model_config.tie_weights:
        del shapes["head.weight"]
    problem = (_raw_weights_problem(tensors, shapes, averaged)
               or _optimizer_problem(tensors, shapes, _MOMENTS[optimizer], steps_taken)
               or _rng_problem(tensors)
               or _hidden_state_problem(tensors, model_config, batch_size))
    if problem:
        raise CheckpointError(f"{path}: {problem}; the file is damaged (resume from a copy, or start a new run)")


def _raw_weights_problem(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                         averaged: bool) -> str | None:
    """What is wrong with the training weights (``raw.<name>``): all of them where ``averaged``, else none."""
    raw = {key[len("raw."):]: value for key, value in tensors.items() if key.startswith("raw.")}
    if set(raw) != (set(shapes) if averaged else set()):
        return ("the training weights of a run with --average are missing or incomplete" if averaged
                else f"unexpected entry {brief('raw.' + sorted(raw)[0])}")
    for name, value in raw.items():
        if tuple(value.shape) != shapes[name] or not value.is_floating_point() or not _is_finite(value):
            return f"the training weights raw.{name} are not {shapes[name]} finite numbers"
    return None


def _optimizer_problem(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                       moments: tuple[str, ...], steps_taken: int | None) -> str | None:
    """What is wrong with the entries besides the training weights: one of no known kind, or the
    optimizer state (``optim.<name>.<part>``) incomplete, misshapen, not finite or negative."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("raw."):
            continue
        if not key.startswith("optim."):
            if key not in ("rng.cpu", "rng.cpu.ranks", "rng.cuda", "rng.cuda.ranks", "hidden.h", "hidden.c"):
                return f"unexpected entry {brief(key)}"
            continue
        name, _, part = key[len("optim."):].rpartition(".")
        if name not in shapes or part not in ("step", *moments) or not moments:
            return f"unexpected optimizer entry {brief(key)}"
        found.setdefault(name, {})[part] = value
    if not found and steps_taken and moments:
        return f"the optimizer state is missing although the run has taken {steps_taken:,} steps"
    if not found:
        return None
    for name, shape in shapes.items():
        parts = found.get(name, {})
        for part in ("step", *moments):
            if part not in parts:
                return f"the optimizer state lacks {name}.{part}"
        step = parts["step"]
        if step.numel() != 1 or not bool(torch.isfinite(step.double()).all()) or float(step.double()) < 0 \
                or (steps_taken is not None and float(step.double()) > steps_taken):
            return f"the optimizer step of {name} is not a count of the run's steps"
        for part in moments:
            moment = parts[part]
            if tuple(moment.shape) != shape:
                return f"the optimizer state {name}.{part} has shape {tuple(moment.shape)}, the parameter has {shape}"
            if moment.dtype == torch.bool or not bool(torch.isfinite(moment.double()).all()):
                return f"the optimizer state {name}.{part} holds NaN, Inf or non-numbers"
            if part in _NON_NEGATIVE and bool((moment < 0).any()):
                return f"the optimizer state {name}.{part} is negative"
    return None


def _rng_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the RNG states: the CPU generator's (and each rank's) must be one the
    generator accepts; the CUDA ones bytes, a row per rank."""
    rng_size = torch.get_rng_state().numel()
    rng = tensors.get("rng.cpu")
    if rng is None or rng.dtype != torch.uint8 or tuple(rng.shape) != (rng_size,):
        return "the RNG state is missing or malformed"
    ranks = tensors.get("rng.cpu.ranks")
    if ranks is not None and (ranks.dtype != torch.uint8 or ranks.dim() != 2 or ranks.shape[1] != rng_size):
        return "the per-process RNG states are malformed"
    for row in [rng, *(ranks if ranks is not None else [])]:
        try:  # the generator checks its own state (mt19937's position and seeded flag)
            torch.Generator().set_state(row.clone())
        except RuntimeError:
            return "the RNG state is not a valid generator state"
    cuda = tensors.get("rng.cuda")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 1):
        return "the CUDA RNG state is malformed"
    cuda_ranks = tensors.get("rng.cuda.ranks")
    if cuda_ranks is not None and (cuda is None or cuda_ranks.dtype != torch.uint8 or cuda_ranks.dim() != 2
                                   or cuda_ranks.shape[1] != cuda.numel()):
        return "the CUDA RNG states of the ranks are malformed"
    return None


def _hidden_state_problem(tensors: dict[str, torch.Tensor], model_config: ModelConfig, batch_size: int) -> str | None:
    """What is wrong with the carried hidden state, if the file has one: the cell's parts, each
    (layers, batch, hidden) finite numbers."""
    expected = (model_config.num_layers, batch_size, model_config.hidden_size)
    parts = [k for k in ("hidden.h", "hidden.c") if k in tensors]
    if not parts:
        return None
    wanted = ["hidden.h", "hidden.c"] if has_cell_state(model_config.cell) else ["hidden.h"]
    if parts != wanted:
        return (f"the carried hidden state has {' and '.join(parts)}; a {model_config.cell.upper()} "
                f"carries {' and '.join(wanted)}")
    for key in parts:
        value = tensors[key]
        if tuple(value.shape) != expected or not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            return f"the carried hidden state {key} is not {expected} finite numbers"
    return None


def restore_resume_tensors(optimizer: torch.optim.Optimizer, model: RNNLM, tensors: dict[str, torch.Tensor],
                           device: torch.device, dist: Dist, kind: str) -> State | None:
    """Restore what ``check_optim_tensors`` accepted: moments through the optimizer's own
    ``load_state_dict`` (which puts each on its parameter's device, and ``step`` where a fused
    optimizer needs it), an averaged run's training weights, this rank's RNG state, and the
    carried hidden state (all B streams), which it returns."""
    order = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for index, p in enumerate(order):
        key = f"optim.{names[id(p)]}"
        if f"{key}.step" in tensors:
            state[index] = {"step": tensors[f"{key}.step"].reshape(()).to(torch.float32),
                            **{part: tensors[f"{key}.{part}"].float() for part in _MOMENTS[kind]}}
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
    raw = {key[len("raw."):]: value for key, value in tensors.items() if key.startswith("raw.")}
    if raw:  # an averaged run's checkpoint holds the average: training goes on from these weights
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(raw[name])
    ranks = tensors.get("rng.cpu.ranks")
    # A fresh copy, never a view: set_rng_state reads the storage from its start, ignoring a
    # view's offset (a row of the ranks table would restore the wrong bytes, or crash).
    own = ranks[dist.rank] if ranks is not None and len(ranks) == dist.world_size else tensors["rng.cpu"]
    torch.set_rng_state(own.clone())
    if "rng.cuda" in tensors and device.type == "cuda":
        cuda_ranks = tensors.get("rng.cuda.ranks")
        own = (cuda_ranks[dist.rank] if cuda_ranks is not None and len(cuda_ranks) == dist.world_size
               else tensors["rng.cuda"])
        torch.cuda.set_rng_state(own.clone())
    if "hidden.h" not in tensors:
        return None
    h = tensors["hidden.h"].float().to(device)
    return (h, tensors["hidden.c"].float().to(device)) if "hidden.c" in tensors else h


@dataclass
class Resume:
    """What ``--resume`` restores: weights, configs, tokenizer, and the optimizer/RNG/hidden state."""

    checkpoint: ckpt.Checkpoint
    optim_tensors: dict[str, torch.Tensor]
    run_dir: Path


def load_resume(run: str | Path) -> Resume:
    """The run in ``run`` as ``--resume`` takes it up: its last checkpoint and resume file, both checked."""
    run = Path(run)
    path = ckpt.resolve_checkpoint(run, prefer=ckpt.LAST)
    if path.name != ckpt.LAST:
        raise CheckpointError(f"{run}: no {ckpt.LAST} to resume from")
    checkpoint = ckpt.load_checkpoint(path)
    optim_name = checkpoint.train_state.get("optim_file")
    if not optim_name or checkpoint.train_config is None:
        raise CheckpointError(f"{path}: holds no training state to resume from")
    optim_path = path.parent / Path(str(optim_name)).name
    tensors, _ = ckpt.load_tensors(optim_path)
    check_optim_tensors(optim_path, tensors, checkpoint.model_config, checkpoint.train_config.batch_size,
                        checkpoint.train_state.get("step"), checkpoint.train_config.optimizer,
                        checkpoint.train_config.average)
    for key in ("step", "epoch", "window"):
        if key not in checkpoint.train_state:
            raise CheckpointError(f"{path}: train_state lacks {key!r}, so the run cannot be resumed")
    if checkpoint.train_config.average and "average_total" not in checkpoint.train_state:  # its value: checked on load
        raise CheckpointError(f"{path}: train_state lacks the weight average's total (average_total), so the run "
                              f"cannot be resumed")
    return Resume(checkpoint, tensors, path.parent)
