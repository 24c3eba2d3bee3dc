"""Each training option is declared once (charlm/training/options.py): the command line, the
Python API, the resume rules and docs/options.md all come from that declaration."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main

import charlm
from charlm.cli import app
from charlm.config import ModelConfig, TrainConfig
from charlm.errors import ConfigError, UsageError
from charlm.training import options as declaration

DOCS = Path(__file__).resolve().parent.parent / "docs" / "options.md"


def _train_command():
    return typer.main.get_command(app).commands["train"]


def test_the_command_line_has_each_declared_option_with_its_default():
    params = {param.name: param for param in _train_command().params}
    for option in declaration.DECLARED:
        param = params.pop(option.name)
        if option.spec.argument:
            assert param.param_type_name == "argument"
            continue
        assert option.flag in param.opts, option.name
        assert param.default == (None if option.kind == "patterns" else option.default), option.name
        if option.kind == "bool" and option.default is not False:
            assert f"--no-{option.flag[2:]}" in param.secondary_opts
        assert option.spec.help in (param.help or ""), option.name
    assert set(params) == {"sample_length", "as_json"}  # the command line's own: the sample and --json


def test_the_python_api_takes_each_declared_option_with_the_same_default():
    fields = {f.name: f for f in dataclasses.fields(charlm.TrainOptions)}
    assert set(fields) == {option.name for option in declaration.DECLARED}
    for option in declaration.DECLARED:
        assert fields[option.name].default == option.default
        assert getattr(declaration.options_from({option.name: option.default}), option.name) == option.default
    with pytest.raises(ConfigError, match="unknown training option"):
        declaration.options_from({"hiden_size": 3})


def test_the_docs_reference_is_the_declaration():
    """docs/options.md is generated: `python -m charlm.training.options > docs/options.md`."""
    text = DOCS.read_text(encoding="utf-8")
    assert text == declaration.reference_markdown() + "\n"
    for option in declaration.DECLARED:
        row = next(line for line in text.splitlines() if line.startswith(f"| {declaration._shown_name(option)} |"))
        assert f"| {declaration._shown_default(option)} |" in row


def test_every_config_setting_has_a_resume_policy():
    """A new setting of the run's configs cannot be added without saying what --resume does with it."""
    settings = {f.name for f in dataclasses.fields(ModelConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}
    settings.discard("vocab_size")
    assert settings <= set(declaration.FIXED_ON_RESUME) | set(declaration.ADJUSTABLE_ON_RESUME)
    assert not set(declaration.FIXED_ON_RESUME) & set(declaration.ADJUSTABLE_ON_RESUME)
    assert set(declaration.NOT_ON_RESUME) == {"min_count", "max_vocab"}


def test_a_mistaken_declaration_is_caught_where_it_is_written():
    with pytest.raises(ValueError):
        declaration.option(1, "No such group", declaration.FIXED, help="x")
    with pytest.raises(ValueError):
        declaration.option(1, declaration.MODEL, declaration.REFUSED, help="x")  # refused without a reason


def test_an_options_object_and_keywords_are_one_request(tmp_path):
    """charlm.train(corpus, TrainOptions(...), **keywords): keywords win; a non-TrainOptions is refused."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh\n" * 400, encoding="utf-8")
    chosen = charlm.TrainOptions(hidden_size=8, embed_size=4, seq_len=8, batch_size=2, max_steps=2, device="cpu",
                                 cache=False, out=str(tmp_path / "a"))
    run = charlm.train(corpus, chosen, hidden_size=12)
    config = charlm.load(run.run_dir).checkpoint.model_config
    assert (config.hidden_size, config.embed_size) == (12, 4)
    with pytest.raises(UsageError, match="TrainOptions"):
        charlm.train(corpus, {"hidden_size": 8})


def _plan(tmp_path, monkeypatch, given, **options):
    from charlm.training import plan, speed

    monkeypatch.setattr(speed, "measure_train_rate", lambda config, **shape: 100_000.0)
    tmp_path.mkdir()
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 300, encoding="utf-8")
    return plan.plan_run(charlm.TrainOptions(corpus=str(corpus), out=str(tmp_path / "run"), device="cpu", **options),
                         given=given)


def test_none_given_for_an_option_the_planner_chooses_means_choose(tmp_path, monkeypatch):
    """charlm.train(optimizer=None, max_minutes=None, …) is the same as leaving them out."""
    left_out = _plan(tmp_path / "a", monkeypatch, set())
    named = _plan(tmp_path / "b", monkeypatch, {"optimizer", "hidden_size", "log_every", "average", "max_minutes",
                                                "lr", "tie_weights", "min_count"})
    assert named.train_config == left_out.train_config and named.model_config == left_out.model_config
    assert named.train_config.max_minutes == declaration.DEFAULT_MINUTES
    assert named.train_config.optimizer == "adamw" and named.train_config.log_every == declaration.DEFAULT_LOG_EVERY


def test_a_default_named_as_given_counts_and_none_patterns_are_none():
    assert declaration.options_from({"include": None, "exclude": None}).include == ()
    assert declaration.options_from({"include": "*.c"}).include == ("*.c",)
    with pytest.raises(ConfigError, match="include must be a file name pattern"):
        declaration.options_from({"include": [""]})


def test_a_fine_tune_refuses_a_device_it_cannot_run_before_reading_the_corpus(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh\n" * 400, encoding="utf-8")
    run = charlm.train(corpus, hidden_size=8, embed_size=4, seq_len=8, batch_size=2, max_steps=1, device="cpu",
                       cache=False, out=str(tmp_path / "base"))
    with pytest.raises(charlm.errors.CharlmError, match="fp16"):  # not "no such file": the corpus is not read
        charlm.train(tmp_path / "missing.txt", init_from=str(run.run_dir), precision="fp16", device="cpu",
                     max_steps=1, out=str(tmp_path / "tuned"))


def test_a_fine_tune_refuses_a_shape_set_to_another_value_and_reads_none_as_not_given(tmp_path):
    """Set on a TrainOptions (given named or not), a shape that differs from the model's is refused,
    never ignored; None for it, even named as given, means "the model's"."""
    from charlm.training import plan

    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh\n" * 400, encoding="utf-8")
    run = charlm.train(corpus, hidden_size=8, embed_size=4, seq_len=8, batch_size=2, max_steps=1, device="cpu",
                       cache=False, out=str(tmp_path / "base"))
    common = dict(corpus=str(corpus), init_from=str(run.run_dir), device="cpu", max_steps=1)
    with pytest.raises(ConfigError, match="--hidden-size 64 conflicts with the model given to --init-from"):
        plan.plan_run(charlm.TrainOptions(hidden_size=64, out=str(tmp_path / "a"), **common))
    tuned = plan.plan_run(charlm.TrainOptions(hidden_size=None, out=str(tmp_path / "b"), **common),
                          given={"hidden_size", "min_count"})
    assert tuned.model_config.hidden_size == 8
