"""The resume policy: a resumed run's configs with the options given honoured or refused (each
option's policy is declared in options.py), and which stopping rule it has already met."""
from __future__ import annotations

from typing import Any

from charlm.config import ModelConfig, TrainConfig, brief
from charlm.errors import ConfigError
from charlm.training.options import ADJUSTABLE_ON_RESUME, BY_NAME, FIXED_ON_RESUME, NOT_ON_RESUME
from charlm.training.resume_state import Resume


def _as_typed(value: Any) -> str:
    """An option value as a user would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value if isinstance(value, str) and len(value) <= 40 else brief(value)


def resume_configs(resume: Resume, given: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The checkpoint's configs with the options the user gave (``given``: only those, by field
    name) honoured or refused, never ignored.

    An option in ``FIXED_ON_RESUME`` must equal the run's value; one in ``ADJUSTABLE_ON_RESUME``
    replaces it for the rest of the run; one in ``NOT_ON_RESUME`` is refused whatever its value.
    Other keys are not this function's (the corpus, the validation file, output options), and a
    ``None`` value means "not given" (no option a user types is ever None).
    """
    given = {key: value for key, value in given.items() if value is not None}
    model_cfg, train_cfg = resume.checkpoint.model_config, resume.checkpoint.train_config
    assert train_cfg is not None  # load_resume guarantees it
    current = {**model_cfg.to_dict(), **train_cfg.to_dict(), "tokenizer": resume.checkpoint.tokenizer.kind}
    for key, value in given.items():
        option = BY_NAME[key].flag
        if key in NOT_ON_RESUME:
            raise ConfigError(f"{option} cannot be given with --resume: {NOT_ON_RESUME[key]}")
        if key in FIXED_ON_RESUME and value != current[key]:
            raise ConfigError(f"{option} {_as_typed(value)} conflicts with the run being resumed, which has "
                              f"{option} {_as_typed(current[key])}; it cannot change on resume (leave it out)")
    return model_cfg, train_cfg.replace(**{k: v for k, v in given.items() if k in ADJUSTABLE_ON_RESUME})


def limit_reached(cfg: TrainConfig, before: TrainConfig | None, state: dict[str, Any], *, step: int, epoch: int,
                   elapsed: float, fixed_total: int | None) -> str | None:
    """Which stopping rule a resumed run has already met, in words (None if it can go on).

    ``before`` is the configuration the run ended with and ``state["stopped_by"]`` what ended it:
    a run that ran out of time (or patience) is finished unless the limit was raised.
    """
    stopped_by = state.get("stopped_by")
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return f"--max-steps {cfg.max_steps:,} (it is at step {step:,})"
    if cfg.epochs is not None and (epoch >= cfg.epochs or (fixed_total is not None and step >= fixed_total)):
        return f"--epochs {cfg.epochs:,} (it is at step {step:,}, epoch {epoch:,})"
    if cfg.max_minutes is not None and (
            elapsed >= cfg.max_minutes * 60 or (stopped_by == "time" and before is not None
                                                and before.max_minutes is not None
                                                and cfg.max_minutes <= before.max_minutes)):
        return f"--max-minutes {cfg.max_minutes:g} (it has trained for {elapsed / 60:.2f} minutes)"
    if (stopped_by == "early-stop" and cfg.patience is not None and before is not None
            and before.patience is not None and cfg.patience <= before.patience):
        return f"--patience {cfg.patience} (it stopped early: no better validation loss in {cfg.patience} evaluations)"
    return None
