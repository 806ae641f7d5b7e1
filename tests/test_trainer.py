"""The GRPO trainer at tiny settings: a step trains, metrics are recorded, resume is exact."""

import dataclasses

import pytest
import torch

from minigrpo.data import arithmetic_examples
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer
from minigrpo.trainer import (
    REWARD_FUNCS,
    GRPOConfig,
    GRPOTrainer,
    WarmupConfig,
    compute_rewards,
    lr_lambda,
    params_sha256,
    warmup_model,
    zero_std_fraction,
)


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TINY = dict(prompts_per_step=4, group_size=4, eval_size=16, eval_every=5, max_new_tokens=4,
            reward_funcs=("has_a_one",), temperature=1.5)
HISTORY_KEYS = {
    "step", "reward_mean", "reward_std", "reward_has_a_one", "zero_std_frac", "loss", "policy_loss",
    "kl", "entropy", "clip_frac_low", "clip_frac_high", "ratio_mean", "completion_len_mean",
    "completion_len_max", "grad_norm", "lr", "step_seconds",
}


def has_a_one(completion: str, answer: str) -> float:
    """A reward an untrained model often earns (so groups have variance and steps have gradients)."""
    return float("1" in completion)


@pytest.fixture(autouse=True)
def easy_reward(monkeypatch):
    monkeypatch.setitem(REWARD_FUNCS, "has_a_one", has_a_one)


def make_trainer(**overrides):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, SMALL, seed=0)
    config = GRPOConfig(**{**TINY, **overrides})
    train = arithmetic_examples(1, held_out=False)
    held_out = arithmetic_examples(1, held_out=True)
    return GRPOTrainer(model, tokenizer, train, held_out, config)


def test_every_config_field_is_documented():
    import inspect

    source = inspect.getsource(GRPOConfig)
    for field in dataclasses.fields(GRPOConfig):
        after = source.split(f"    {field.name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), field.name


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOConfig(reward_funcs=("exact_match",), reward_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOConfig(reward_funcs=("nope",))
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=0)


def test_weighted_rewards_and_zero_variance_groups():
    config = GRPOConfig(reward_funcs=("exact_match", "format"), reward_weights=(1.0, 0.5))
    rewards, means = compute_rewards(["12", "\\boxed{3}", "7", "7"], ["12", "3", "8", "7"], config)
    assert rewards.tolist() == [1.0, 0.5, 0.0, 1.0]
    assert means == {"reward_exact_match": 0.5, "reward_format": 0.25}
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == 0.5


def test_lr_schedule_warms_up_and_decays():
    f = lr_lambda(GRPOConfig(steps=10, warmup_steps=2, lr_schedule="linear"))
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda(GRPOConfig(steps=10))(7) == 1.0


def test_one_step_changes_parameters_and_records_metrics():
    trainer = make_trainer(steps=1, lr=1e-2, beta=0.04)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert metrics["reward_std"] > 0 and metrics["grad_norm"] > 0
    assert HISTORY_KEYS <= set(metrics)
    assert trainer.history == [metrics] and metrics["step"] == 1
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # β > 0: kl is a float
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert metrics["ratio_mean"] == pytest.approx(1.0)  # μ = 1: ρ ≡ 1, at τ = 1.5 too
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # π_ref = π_θ before the update


def test_several_updates_and_minibatches_move_the_ratio():
    trainer = make_trainer(steps=2, num_updates=2, num_minibatches=2, lr=1e-2, beta=0.0)
    trainer.train(progress=False)
    assert len(trainer.history) == 2 and [e["step"] for e in trainer.evals] == [0, 2]
    assert trainer.history[-1]["kl"] is None  # β = 0: no reference model
    assert any(h["ratio_mean"] != 1.0 for h in trainer.history)  # later mini-batches see ρ ≠ 1


def test_resume_is_exact(tmp_path):
    config = dict(steps=8, lr=3e-3, beta=0.04, lr_schedule="cosine", warmup_steps=2, temperature=1.5)
    straight = make_trainer(**config)
    straight.train(progress=False)

    first = make_trainer(**config)
    first.train(until=4, checkpoint_dir=tmp_path, progress=False)
    resumed = make_trainer(**config)
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == 4
    resumed.train(progress=False)

    assert params_sha256(resumed.model) == params_sha256(straight.model)
    assert params_sha256(first.model) != params_sha256(straight.model)  # it did train after step 4
    strip = lambda h: [{k: v for k, v in m.items() if k != "step_seconds"} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert resumed.evals == straight.evals


def test_warmup_cache_returns_the_same_model_and_info(tmp_path):
    config = WarmupConfig(steps=3, batch_size=8, model=SMALL, seed=5)
    model, _, info = warmup_model(config, cache_dir=tmp_path, progress=False)
    cached, tokenizer, cached_info = warmup_model(config, cache_dir=tmp_path, progress=False)
    assert params_sha256(model) == params_sha256(cached)
    assert cached_info == info and len(info["losses"]) == 3
    assert tokenizer.decode(tokenizer("1+2=")["input_ids"], skip_special_tokens=True) == "1+2="


def test_a_single_update_takes_old_logprobs_from_its_own_pass(monkeypatch):
    """μ = 1 over one mini-batch skips the separate π_θold pass; the step is the same as with it."""
    fast = make_trainer(steps=1, lr=1e-2, beta=0.04)
    assert fast.single_update
    fast_metrics = fast.train_step()
    monkeypatch.setattr(GRPOTrainer, "single_update", property(lambda self: False))
    slow = make_trainer(steps=1, lr=1e-2, beta=0.04)
    slow_metrics = slow.train_step()
    for a, b in zip(fast.model.parameters(), slow.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "kl", "entropy", "ratio_mean", "reward_mean"):
        assert fast_metrics[key] == pytest.approx(slow_metrics[key], rel=1e-5, abs=1e-6), key
