import pytest

from charlm.config import ModelConfig, SampleConfig, TrainConfig
from charlm.training.autosize import auto_size
from charlm.errors import ConfigError


def test_round_trip_through_dict():
    cfg = ModelConfig(vocab_size=65, cell="gru", hidden_size=64, embed_size=64, tie_weights=True, dropout=0.2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    tcfg = TrainConfig(max_steps=10, patience=3)
    assert TrainConfig.from_dict(tcfg.to_dict()) == tcfg


@pytest.mark.parametrize("kwargs, option", [
    (dict(cell="transformer"), "--cell"), (dict(hidden_size=0), "--hidden-size"), (dict(dropout=1.0), "--dropout"),
    (dict(tie_weights=True, embed_size=8, hidden_size=16), "--tie-weights"),
])
def test_model_config_rejects_bad_values(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        ModelConfig(vocab_size=10, **kwargs)


@pytest.mark.parametrize("kwargs, option", [
    (dict(lr=0), "--lr"), (dict(batch_size=0), "--batch-size"), (dict(val_fraction=1.0), "--val-fraction"),
    (dict(max_minutes=-1), "--max-minutes"), (dict(device="tpu"), "--device"), (dict(clip=float("nan")), "--clip"),
])
def test_train_config_rejects_bad_values(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, option", [
    (dict(temperature=-0.1), "--temperature"), (dict(top_k=0), "--top-k"), (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"), (dict(length=-1), "--length"), (dict(num_samples=0), "--num-samples"),
])
def test_sample_config_rejects_bad_values(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        SampleConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown fields"):
        ModelConfig.from_dict({"vocab_size": 3, "colour": "red"})


def test_auto_size_grows_with_budget_and_is_capped_by_small_data():
    small = auto_size(tokenizer="char", train_tokens=1_000_000, max_minutes=3, gpu=False)
    large = auto_size(tokenizer="char", train_tokens=1_000_000, max_minutes=10, gpu=False)
    assert (small.hidden_size, small.num_layers) == (512, 1)
    assert large.hidden_size > small.hidden_size
    assert (small.batch_size, large.batch_size) == (16, 32)  # wider layers keep more streams busy
    assert TrainConfig().min_lr_ratio == 0.0  # the schedule decays to zero (the 10-minute sweep)
    tiny = auto_size(tokenizer="char", train_tokens=20_000, max_minutes=60, gpu=False)
    assert tiny.hidden_size == 256 and tiny.dropout > 0  # many epochs on little data: regularise
    word = auto_size(tokenizer="word", train_tokens=200_000, max_minutes=10, gpu=False)
    assert word.tie_weights and word.embed_size == word.hidden_size


def test_word_models_get_sgd_and_regularisation_that_grows_with_the_epochs_the_budget_buys():
    one_pass = auto_size(tokenizer="word", train_tokens=10_000_000, max_minutes=3, gpu=False)
    grimm = auto_size(tokenizer="word", train_tokens=88_000, max_minutes=3, gpu=False)
    long = auto_size(tokenizer="word", train_tokens=88_000, max_minutes=60, gpu=False)
    assert grimm.optimizer == one_pass.optimizer == "sgd" and grimm.batch_size == 20 and grimm.tie_weights
    rates = lambda a: (a.dropout, a.input_dropout, a.embed_dropout, a.weight_drop)  # noqa: E731
    assert all(x <= y for x, y in zip(rates(one_pass), rates(grimm))) and rates(one_pass) != rates(grimm)
    assert all(x <= y for x, y in zip(rates(grimm), rates(long))) and long.weight_drop > 0
    char = auto_size(tokenizer="char", train_tokens=1_000_000, max_minutes=3, gpu=False)
    assert char.optimizer == "adamw" and (char.embed_dropout, char.weight_drop) == (0.0, 0.0)


def test_bf16_buys_the_next_size_up_and_more_dropout_while_fp32_keeps_its_defaults():
    for minutes, fp32_size, bf16_size in ((3, 512, 768), (10, 768, 1024)):
        fp32 = auto_size(tokenizer="char", train_tokens=1_003_854, max_minutes=minutes, gpu=False)
        bf16 = auto_size(tokenizer="char", train_tokens=1_003_854, max_minutes=minutes, gpu=False, bf16=True)
        assert (fp32.hidden_size, bf16.hidden_size) == (fp32_size, bf16_size)
        assert fp32.dropout == 0.0  # the measured fp32 defaults (docs/choosing.md) are unchanged
    assert bf16.dropout == 0.2  # 10 minutes of bf16 buys ~5 epochs of the larger model
    small = auto_size(tokenizer="char", train_tokens=150_000, max_minutes=10, gpu=False, bf16=True)
    assert small.hidden_size == 256  # small data caps the model in either precision


def test_bf16_word_models_expect_more_epochs_and_regularise_more():
    fp32 = auto_size(tokenizer="word", train_tokens=88_000, max_minutes=3, gpu=False)
    bf16 = auto_size(tokenizer="word", train_tokens=88_000, max_minutes=3, gpu=False, bf16=True)
    assert fp32.hidden_size == bf16.hidden_size == 400
    assert (fp32.dropout, fp32.weight_drop) == (0.3, 0.2)  # ~14 epochs (Grimm, 3 minutes)
    assert (bf16.dropout, bf16.input_dropout, bf16.embed_dropout, bf16.weight_drop) == (0.4, 0.5, 0.1, 0.3)
    long = auto_size(tokenizer="word", train_tokens=88_000, max_minutes=10, gpu=False, bf16=True)  # ~49 epochs
    assert (long.dropout, long.input_dropout, long.embed_dropout, long.weight_drop) == (0.5, 0.65, 0.1, 0.5)


def test_the_plan_measures_this_machine_only_for_a_shape_it_chooses(tmp_path, monkeypatch):
    import torch

    from charlm.training import plan as planning
    from charlm.training import speed
    from charlm.model.precision import FP32

    cfg = ModelConfig(vocab_size=30, hidden_size=16, embed_size=8)
    before = torch.get_rng_state()
    rate = speed.measure_train_rate(cfg, batch_size=4, seq_len=10, precision=FP32)
    assert 0 < rate < float("inf") and torch.equal(torch.get_rng_state(), before)

    asked = []
    monkeypatch.setattr(speed, "measure_train_rate",
                        lambda config, **shape: asked.append((config.hidden_size, shape["batch_size"])) or 1e6)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus of characters, repeated.\n" * 300, encoding="utf-8")
    options = dict(corpus=str(corpus), max_minutes=1, device="cpu")
    chosen = planning.plan_run(planning.TrainOptions(out=str(tmp_path / "a"), **options))
    assert asked == [(chosen.model_config.hidden_size, chosen.train_config.batch_size)]
    assert any("sized for this machine" in note and "1000.0k" in note for note in chosen.notes)
    planning.plan_run(planning.TrainOptions(out=str(tmp_path / "b"), hidden_size=32, **options), given={"hidden_size"})
    planning.plan_run(planning.TrainOptions(out=str(tmp_path / "c"), max_steps=5, corpus=str(corpus), device="cpu"))
    planning.plan_run(planning.TrainOptions(out=str(tmp_path / "d"), tokenizer="word", **options))
    assert len(asked) == 1  # a shape given, no time budget, or words: the tables' estimate, nothing measured
