"""The GRPO trainer at tiny settings: a step trains, metrics are recorded once each, choices are
checked when the config is built, resume is exact, the global RNGs are left alone."""

import dataclasses
import inspect
import math

import pytest
import torch

from minigrpo import models
from minigrpo.arithmetic import WarmupConfig, supervised_loss, warmup_model
from minigrpo.data import arithmetic_examples
from minigrpo.evaluation import EvalResult
from minigrpo.rewards import exact_match_reward, format_reward
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer
from minigrpo.metrics import METRICS, MetricLog, metric_label, reduce_updates
from minigrpo import distributed
from minigrpo.advantages import combine, compute_rewards, live_groups, soft_overlong_penalty, zero_std_fraction
from minigrpo.config import GRPOConfig
from minigrpo.distributed import params_sha256
from minigrpo.optim import lr_lambda
from minigrpo.rollout import score
from minigrpo.trainer import SAMPLER_FILE, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def mean(completion: str, answer: str) -> float:
    """A reward whose name clashes with the logged ``reward_mean``."""
    return 0.0


def has_a_one(completion: str, answer: str) -> float:
    """A reward an untrained model often earns (so groups have variance and steps have gradients)."""
    return float("1" in completion)


SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TINY = dict(prompts_per_step=4, group_size=4, eval_size=16, eval_every=5, max_new_tokens=4,
            reward_funcs=(has_a_one,), temperature=1.5)
HISTORY_KEYS = {
    "step", "reward_mean", "reward_std", "reward_has_a_one", "zero_std_frac", "truncated_frac", "loss",
    "policy_loss", "kl", "kl_token_mean", "entropy", "entropy_token_mean", "clip_frac_low", "clip_frac_high",
    "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "advantages_abs_mean", "zero_advantage_frac",
    "completion_tokens_mean", "completion_tokens_pos_adv", "completion_tokens_neg_adv", "grad_norm", "lr",
    "groups_sampled", "skipped_updates", "masked_frac",
    "step_seconds",
}


def make_trainer(model=None, **overrides):
    tokenizer = build_tokenizer()
    model = model if model is not None else build_model(tokenizer, SMALL, seed=0)
    config = GRPOConfig(**{**TINY, **overrides})
    train = arithmetic_examples(1, held_out=False)
    held_out = arithmetic_examples(1, held_out=True)
    return GRPOTrainer(model, tokenizer, train, held_out, config)


def test_every_config_field_is_documented():
    source = inspect.getsource(GRPOConfig)
    for field in dataclasses.fields(GRPOConfig):
        after = source.split(f"    {field.name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), field.name


@pytest.mark.parametrize("overrides, name", [
    (dict(reward_weights=(1.0, 2.0)), "reward_weights"),
    (dict(reward_funcs=("exact_match",)), "callables"),
    (dict(reward_weights=(math.nan,)), "reward_weights"),
    (dict(group_size=0), "group_size"),
    (dict(loss_type="bnpo"), "loss_type"),
    (dict(ratio_level="seq"), "ratio_level"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(advantage_scale="std"), "advantage_scale"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(beta=-0.1), "beta"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(temperature=0.0), "temperature"),
    (dict(lr=0), "lr"),
    (dict(steps=2.5), "steps"),
    (dict(max_grad_norm=math.inf), "max_grad_norm"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),  # would clip every gradient to zero
    (dict(prompts_per_step=3, group_size=3, num_minibatches=2), "num_minibatches"),
    (dict(reward_funcs=(format_reward, format_reward), reward_weights=(1, 1)), "distinct"),
    (dict(reward_funcs=(mean,)), "distinct"),  # would be logged as reward_mean, a metric of its own
    (dict(advantage_baseline="median"), "advantage_baseline"),
    (dict(advantage_baseline="leave_one_out", group_size=1), "leave_one_out"),
    (dict(surrogate="ppo"), "surrogate"),
    (dict(surrogate="cispo", ratio_level="sequence"), "cispo"),
    (dict(overlong_cache=4, max_new_tokens=4), "overlong_cache"),
    (dict(dynamic_sampling=1), "dynamic_sampling"),
    (dict(max_sampling_rounds=0), "max_sampling_rounds"),
    (dict(eval_max_new_tokens=0), "eval_max_new_tokens"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(sampler_dtype="fp16"), "sampler_dtype"),
    (dict(sampler_dtype=True), "sampler_dtype"),
    (dict(rollout_lag=-1), "rollout_lag"),
    (dict(rollout_lag=1.5), "rollout_lag"),
    (dict(rollout_correction="tis"), "rollout_correction"),
    (dict(rollout_ratio_min=0.0), "rollout_ratio_min"),
    (dict(rollout_ratio_min=-1.0), "rollout_ratio_min"),
    (dict(rollout_ratio_max=math.inf), "rollout_ratio_max"),
    (dict(rollout_ratio_max=True), "rollout_ratio_max"),
    (dict(rollout_ratio_min=2.0, rollout_ratio_max=1.0), "rollout_ratio_min"),
    (dict(off_policy_mask_threshold=math.nan), "off_policy_mask_threshold"),
    (dict(off_policy_mask_threshold="0.5"), "off_policy_mask_threshold"),
])
def test_config_rejects_bad_values_when_built(overrides, name):
    with pytest.raises(ValueError, match=name):
        GRPOConfig(**overrides)


def test_config_accepts_the_rollout_correction_settings():
    """Defaults: no correction, no mask, TRL's bounds [None, 3]; any mode with positive bounds
    (None: no bound; C_min = C_max allowed) and any finite δ, negative too."""
    c = GRPOConfig()
    assert (c.rollout_correction, c.rollout_ratio_min, c.rollout_ratio_max, c.off_policy_mask_threshold) == (
        None, None, 3.0, None)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        GRPOConfig(rollout_correction=mode, rollout_ratio_min=0.5, rollout_ratio_max=2, off_policy_mask_threshold=0.5)
    GRPOConfig(rollout_correction="token_mask", rollout_ratio_min=1, rollout_ratio_max=1, off_policy_mask_threshold=-1)
    GRPOConfig(rollout_correction="token_truncate", rollout_ratio_min=None, rollout_ratio_max=None)


@pytest.mark.parametrize("overrides, name", [
    (dict(sloppiness=1.5), "sloppiness"), (dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(digits=1.0), "digits"),
])
def test_warmup_config_rejects_bad_values_when_built(overrides, name):
    with pytest.raises(ValueError, match=name):
        WarmupConfig(**overrides)


def test_config_to_dict_names_the_reward_functions():
    values = GRPOConfig(reward_funcs=(exact_match_reward, format_reward), reward_weights=(1, 0.5)).to_dict()
    assert values["reward_funcs"] == ["exact_match_reward", "format_reward"]
    assert values["accuracy_reward"] == "exact_match_reward"


def test_weighted_rewards_and_zero_variance_groups():
    parts, means = compute_rewards(["12", "\\boxed{3}", "7", "7"], ["12", "3", "8", "7"],
                                   (exact_match_reward, format_reward), (1.0, 0.5))
    assert parts.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    assert combine(parts, torch.tensor([1.0, 0.5])).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert means == {"reward_exact_match_reward": 0.5, "reward_format_reward": 0.25}
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == 0.5


def test_lr_schedules_warm_up_and_decay():
    f = lr_lambda(GRPOConfig(steps=10, warmup_steps=2, lr_schedule="linear"))
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    f = lr_lambda(GRPOConfig(steps=10, warmup_steps=2, lr_schedule="cosine"))
    assert [round(f(s), 3) for s in (0, 2, 6, 10, 12)] == [0.5, 1.0, 0.5, 0.0, 0.0]
    assert lr_lambda(GRPOConfig(steps=10))(7) == 1.0


def test_a_metric_is_written_once_and_has_a_label():
    log = MetricLog(loss=1.0)
    with pytest.raises(KeyError, match="twice"):
        log["loss"] = 2.0
    with pytest.raises(KeyError):
        log["no_such_metric"] = 0.0
    assert metric_label("reward_format_reward") == "mean format_reward reward"


def test_updates_reduce_to_one_value_per_metric():
    """Over a step's updates: the extremes of the ratio by min and max, the rest by the mean,
    None (no reference model) stays None."""
    records = [dict(ratio_min=0.9, ratio_max=1.1, loss=1.0, kl=None, completion_tokens_pos_adv=None),
               dict(ratio_min=0.7, ratio_max=1.05, loss=3.0, kl=None, completion_tokens_pos_adv=4.0)]
    assert reduce_updates(records) == dict(ratio_min=0.7, ratio_max=1.1, loss=2.0, kl=None,
                                           completion_tokens_pos_adv=4.0)  # over the updates that have one


def test_one_step_changes_parameters_and_records_metrics():
    trainer = make_trainer(steps=1, lr=1e-2, beta=0.04)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert metrics["reward_std"] > 0 and metrics["grad_norm"] > 0
    assert set(metrics) == HISTORY_KEYS
    assert all(metric_label(key) for key in metrics)  # every key has its one label
    assert trainer.history == [metrics] and metrics["step"] == 1
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # β > 0: kl is a float
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert metrics["ratio_mean"] == metrics["ratio_min"] == metrics["ratio_max"] == pytest.approx(1.0)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # π_ref = π_θ before the update
    assert 0.0 <= metrics["truncated_frac"] <= 1.0


def test_the_trainer_leaves_the_global_rngs_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trainer = make_trainer(steps=2, lr=1e-2)
    trainer.train(progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_several_updates_and_minibatches_move_the_ratio():
    trainer = make_trainer(steps=2, num_updates=2, num_minibatches=2, lr=1e-2, beta=0.0)
    trainer.train(progress=False)
    assert len(trainer.history) == 2 and [e.step for e in trainer.evals] == [0, 2]
    assert trainer.history[-1]["kl"] is trainer.history[-1]["kl_token_mean"] is None  # β = 0: no reference
    h = trainer.history[-1]
    assert h["ratio_min"] < h["ratio_mean"] < h["ratio_max"]  # later mini-batches see ρ ≠ 1


@pytest.mark.parametrize("scale", ["batch", "none"])
def test_advantage_scale_reaches_the_loss(scale):
    """Same rollout, different Â: "none" leaves Â = r − mean, so |Â| ≤ 1 for 0/1 rewards."""
    h = make_trainer(steps=1, lr=1e-2, advantage_scale=scale).train_step()
    default = make_trainer(steps=1, lr=1e-2).train_step()
    assert h["reward_mean"] == default["reward_mean"]  # same samples
    assert h["advantages_abs_mean"] != default["advantages_abs_mean"]


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


def test_resume_is_exact_and_checkpoints_load_with_weights_only(tmp_path):
    config = dict(steps=8, lr=3e-3, beta=0.04, lr_schedule="cosine", warmup_steps=2)
    straight = make_trainer(**config)
    straight.train(progress=False)

    first = make_trainer(**config)
    first.train(until=4, checkpoint_dir=tmp_path, progress=False)
    for name in ("trainer_state.pt", "rng_rank0.pt"):
        torch.load(tmp_path / name, weights_only=True)  # nothing in it can run code
    resumed = make_trainer(**config)
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == 4 and isinstance(resumed.evals[0], EvalResult)
    resumed.train(progress=False)

    assert params_sha256(resumed.model) == params_sha256(straight.model)
    assert params_sha256(first.model) != params_sha256(straight.model)  # it did train after step 4
    strip = lambda h: [{k: v for k, v in m.items() if k != "step_seconds"} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert resumed.evals == straight.evals


def test_lora_policy_checkpoints_and_resumes(tmp_path):
    """A LoRA policy: the reference is the adapter-disabled view (nothing of its own saved),
    and the adapter's weights come back from the checkpoint."""
    def lora_trainer():
        tokenizer = build_tokenizer()
        base = models.random_model(models.qwen25_05b_config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id))
        return make_trainer(models.prepare_for_training(base, lora_rank=2), steps=2, lr=1e-2)

    trainer = lora_trainer()
    assert not trainer.owns_ref and isinstance(trainer.ref_model, models.AdapterDisabled)
    start = params_sha256(trainer.model)
    trainer.train(checkpoint_dir=tmp_path, progress=False)
    assert params_sha256(trainer.model) != start  # the adapter trained: the round trip is not vacuous
    assert not (tmp_path / "ref_model.safetensors").exists()
    restored = lora_trainer()
    restored.load_checkpoint(tmp_path)
    assert params_sha256(restored.model) == params_sha256(trainer.model)
    assert restored.step == 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefill_updates_as_the_plain_forward_does(checkpointing):
    """On the same rollout, an update whose forward runs each prompt once per group
    (``shared_prefill``) moves the parameters as the plain forward does; with gradient
    checkpointing, which keeps no KV cache, the update takes the plain forward."""
    def trainer(shared):
        model = build_model(build_tokenizer(), SMALL, seed=0).double()
        model = models.prepare_for_training(model, gradient_checkpointing=checkpointing)
        return make_trainer(model, shared_prefill=shared, beta=0.04, alpha=0.01, lr=1e-2)

    plain, shared = trainer(False), trainer(True)
    start = [p.detach().clone() for p in plain.model.parameters()]
    torch.manual_seed(0)
    batch, parts, weights, _ = plain.sample_batch()
    advantages = plain.advantages(parts, weights)
    assert advantages.abs().sum() > 0
    records = []
    for t in (plain, shared):  # plain SGD at lr 1: each parameter moves by −(its gradient)
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=1.0)
        records.append(t.policy_updates(batch, advantages))
    steps = [[p.detach() - p0 for p, p0 in zip(t.model.parameters(), start)] for t in (plain, shared)]
    largest = max(s.abs().max().item() for s in steps[0])
    assert largest > 0
    for a, b in zip(*steps):  # RMSNorm's float32 upcast: equal to ~1e-8 of the largest, not bitwise
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * largest)
    assert records[0]["loss"] == pytest.approx(records[1]["loss"], abs=1e-9)


def test_supervised_loss_is_the_answer_tokens_mean_nll():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, SMALL, seed=0)
    batch = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "45+67=", "completion": "112"}]
    loss = supervised_loss(model, tokenizer, batch)
    nll = []
    with torch.no_grad():
        for ex in batch:  # one unpadded sequence at a time
            prompt = tokenizer(ex["prompt"])["input_ids"]
            answer = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            nll += (-torch.log_softmax(logits, -1)[range(len(answer)), answer]).tolist()
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)  # 2 + 4 answer tokens


def test_warmup_cache_returns_the_same_model_and_info(tmp_path):
    config = WarmupConfig(steps=3, batch_size=8, model=SMALL, seed=5)
    model, _, info = warmup_model(config, cache_dir=tmp_path, progress=False)
    cached, tokenizer, cached_info = warmup_model(config, cache_dir=tmp_path, progress=False)
    assert params_sha256(model) == params_sha256(cached)
    assert not info.pop("cached") and cached_info.pop("cached")
    assert cached_info == info and len(info["losses"]) == 3
    assert tokenizer.decode(tokenizer("1+2=")["input_ids"], skip_special_tokens=True) == "1+2="


def test_warmup_key_changes_with_the_numerics_pins_and_torch(monkeypatch):
    """A warm-up cached without the CPU numerics pins (or under another torch) is never loaded
    by a run with them: each pin's value, and the torch version, is part of the cache key."""
    from minigrpo import arithmetic

    config = WarmupConfig(steps=3, batch_size=8, model=SMALL, seed=5)
    for name in arithmetic.NUMERICS_PINS:
        monkeypatch.delenv(name, raising=False)
    keys = {arithmetic.warmup_key(config)}
    for name, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "COMPATIBLE"),
                        ("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_CBWR", "AVX2")):
        monkeypatch.setenv(name, value)
        keys.add(arithmetic.warmup_key(config))
    assert len(keys) == 5  # unset, then each pin set, then one changed: five different keys
    pinned = arithmetic.warmup_key(config)
    assert arithmetic.warmup_key(config) == pinned  # and the same environment, the same key
    monkeypatch.setattr(arithmetic.torch, "__version__", "0.0.0")
    assert arithmetic.warmup_key(config) != pinned


def test_metric_labels_cover_the_loss_metrics():
    from minigrpo.losses import loss_metrics

    m = torch.ones(2, 3, dtype=torch.bool)
    assert set(loss_metrics(torch.ones(2, 3), torch.zeros(2), m, 0.2, 0.2)) <= set(METRICS)


@pytest.mark.parametrize("cuda", [False, True])
def test_init_distributed_picks_nccl_and_the_local_gpu_on_gpus(monkeypatch, cuda):
    """Under torchrun on GPUs each rank takes GPU LOCAL_RANK and NCCL; on CPUs, gloo."""
    import torch.distributed as dist

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    distributed.init_distributed()
    assert calls == ({"device": 3, "backend": "nccl"} if cuda else {"backend": "gloo"})


def test_dynamic_sampling_keeps_only_groups_with_signal():
    """Groups whose G rewards are all equal are dropped and more prompts rolled out, at most
    max_sampling_rounds times; the batch holds at most P live groups, in the rollouts' order."""
    trainer = make_trainer(dynamic_sampling=True, max_sampling_rounds=3, prompts_per_step=4, group_size=4)
    with trainer.own_rng():
        batch, parts, weights, metrics = trainer.sample_batch()
    rewards = combine(parts, weights)
    n_groups = rewards.numel() // 4
    assert 1 <= n_groups <= 4 and batch.completion_ids.shape[0] == rewards.numel() == len(batch.completions)
    assert live_groups(rewards, 4) == list(range(n_groups))  # every group kept has signal
    kept_parts, _ = compute_rewards(batch.completions, batch.answers, trainer.config.reward_funcs,
                                    trainer.config.reward_weights)
    torch.testing.assert_close(parts, kept_parts)  # each kept group's rewards are its own
    assert metrics["groups_sampled"] in (4, 8, 12)  # one to three rollouts of 4 prompts
    assert (metrics["groups_sampled"] == 4) == (n_groups == 4 and metrics["zero_std_frac"] == 0)
    again = make_trainer(dynamic_sampling=True, max_sampling_rounds=3, prompts_per_step=4, group_size=4)
    again.train_step()  # and the step trains on it
    assert again.history[-1]["groups_sampled"] == metrics["groups_sampled"]


def test_dynamic_sampling_off_is_one_rollout():
    trainer = make_trainer()
    with trainer.own_rng():
        batch, parts, weights, metrics = trainer.sample_batch()
    assert metrics["groups_sampled"] == 4 and parts.shape == (1, 16)


def test_truncated_completions_can_be_masked_out_of_the_loss():
    """With max_new_tokens = 1 no completion reaches its EOS: overlong filtering masks every
    token, so the step has no gradient at all (β = 0)."""
    trainer = make_trainer(max_new_tokens=1, mask_truncated=True, beta=0.0)
    trainer.train_step()
    h = trainer.history[-1]
    assert h["truncated_frac"] == 1.0 and h["grad_norm"] == 0.0 and h["masked_frac"] == 1.0
    assert h["completion_tokens_mean"] == 1.0  # lengths count every completion, the masked ones too


def test_soft_overlong_penalty():
    """0 up to L_max − L_cache tokens, then linear down to −1 at L_max (DAPO's eq. 13)."""
    lengths = torch.tensor([2, 6, 7, 8, 10])
    torch.testing.assert_close(soft_overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    trainer = make_trainer(max_new_tokens=4, overlong_cache=2)
    trainer.train_step()
    assert -1.0 <= trainer.history[-1]["reward_overlong_penalty"] <= 0.0


def test_options_reach_the_loss(monkeypatch):
    """advantage_baseline, surrogate and kl_bias_correction arrive where they act."""
    from minigrpo import trainer as trainer_module

    seen = {}
    real_adv, real_loss = trainer_module.group_advantages, trainer_module.grpo_loss
    monkeypatch.setattr(trainer_module, "group_advantages",
                        lambda *a, **k: seen.setdefault("baseline", k["baseline"]) and real_adv(*a, **k))
    monkeypatch.setattr(trainer_module, "grpo_loss", lambda *a, **k: seen.update(
        surrogate=k["surrogate"], kl_bias_correction=k["kl_bias_correction"]) or real_loss(*a, **k))
    make_trainer(advantage_baseline="leave_one_out", surrogate="cispo", loss_type="dapo",
                 kl_bias_correction=True).train_step()
    assert seen == {"baseline": "leave_one_out", "surrogate": "cispo", "kl_bias_correction": True}


def test_each_reward_can_be_normalised_on_its_own():
    """Two rewards on different scales: normalising the sum lets the wide one dominate;
    normalising each first gives Σ_k w_k·Â(r_k)."""
    from minigrpo.advantages import group_advantages

    parts = torch.tensor([[1.0, 0.0, 1.0, 0.0], [10.0, 0.0, 0.0, 20.0]])  # (K = 2, N = 4), one group
    weights = torch.tensor([1.0, 0.5])
    for each in (False, True):
        trainer = make_trainer(reward_funcs=(has_a_one, exact_match_reward), reward_weights=(1.0, 0.5),
                               prompts_per_step=1, group_size=4, normalize_each_reward=each)
        got = trainer.advantages(parts, weights)
        want = (group_advantages(parts[0], 4) + 0.5 * group_advantages(parts[1], 4) if each
                else group_advantages(combine(parts, weights), 4))
        torch.testing.assert_close(got, want)


def test_policy_updates_leave_the_model_in_its_mode_after_an_exception(monkeypatch):
    trainer = make_trainer()
    trainer.model.eval()
    with trainer.own_rng():
        batch, parts, weights, _ = trainer.sample_batch()

    def fail(*args):
        assert trainer.model.training  # the update runs in training mode
        raise RuntimeError("out of memory")

    monkeypatch.setattr(trainer, "update", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.policy_updates(batch, trainer.advantages(parts, weights))
    assert not trainer.model.training  # back in eval mode, where generation keeps its KV cache


def test_a_non_finite_gradient_skips_the_step_with_a_warning(caplog):
    trainer = make_trainer(beta=0.0)
    first = next(trainer.model.parameters())
    first.register_hook(lambda grad: grad * math.nan)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level("WARNING", logger="minigrpo"):
        h = trainer.train_step()
    assert h["skipped_updates"] == 1 and h["grad_norm"] is None
    assert "optimiser step skipped" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # no NaN written in


def test_bad_data_and_reserved_reward_names_are_refused():
    with pytest.raises(ValueError, match="train_examples is empty"):
        GRPOTrainer(build_model(build_tokenizer(), SMALL), build_tokenizer(), [], [], GRPOConfig(**TINY))

    def overlong_penalty(completion, answer):
        return 0.0

    with pytest.raises(ValueError, match="overlong_penalty"):  # the name DAPO's penalty is logged under
        GRPOConfig(reward_funcs=(overlong_penalty,), reward_weights=(1.0,))


def test_checkpoints_refuse_another_config_and_survive_a_crash_while_writing(tmp_path, monkeypatch):
    """A checkpoint written under one config does not load into a run with another; a write
    that fails half-way leaves the previous checkpoint whole; after a crash between the swap's
    two renames the checkpoint is found in ``<dir>.old``."""
    from minigrpo import checkpoints

    folder = tmp_path / "ck"
    trainer = make_trainer(steps=2, beta=0.04)
    trainer.train(until=1, checkpoint_dir=folder, progress=False)
    with pytest.raises(ValueError, match="lr: 0.0001 in the checkpoint, 0.002 now"):
        make_trainer(steps=2, beta=0.04, lr=2e-3).load_checkpoint(folder)
    with pytest.raises(ValueError, match="no checkpoint"):
        make_trainer(steps=2, beta=0.04).load_checkpoint(tmp_path / "elsewhere")

    trainer.train_step()  # step 2, then a write that dies after the model file
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(folder)
    monkeypatch.setattr(torch, "save", real_save)
    restored = make_trainer(steps=2, beta=0.04)
    restored.load_checkpoint(folder)
    assert restored.step == 1  # the step-1 checkpoint, whole

    trainer.save_checkpoint(folder)
    folder.rename(tmp_path / "ck.old")  # as if the process died between the two renames
    assert checkpoints.locate(folder) == tmp_path / "ck.old"
    again = make_trainer(steps=2, beta=0.04)
    again.load_checkpoint(folder)
    assert again.step == 2 and params_sha256(again.model) == params_sha256(trainer.model)


# ---------------------------------------------------------------- a sampler that is a different program


def strip_time(history):
    return [{k: v for k, v in m.items() if k != "step_seconds"} for m in history]


def keep_batches(trainer) -> list:
    """Every training batch ``trainer`` samples from now on (its ``sample_batch`` wrapped)."""
    batches, sample_batch = [], trainer.sample_batch

    def spy():
        out = sample_batch()
        batches.append(out[0])
        return out

    trainer.sample_batch = spy
    return batches


def test_without_a_separate_sampler_the_policy_samples_as_before(monkeypatch):
    """No sampler_dtype and lag 0 (the defaults): no sampler is built, ``rollout`` gets
    ``sampler=None``, ``top_k=0``, ``top_p=1.0`` (its code path of before: the policy samples
    softmax(logits / τ) and scores it), batches have no rollout log-probs, and the run is bit for
    bit the default config's."""
    from minigrpo import trainer as trainer_module

    seen, real = [], trainer_module.rollout
    monkeypatch.setattr(trainer_module, "rollout", lambda *a, **k: seen.append(k) or real(*a, **k))
    config = dict(steps=3, lr=1e-2, beta=0.04, num_updates=2)
    default = make_trainer(**config)
    batches = keep_batches(default)
    default.train(progress=False)
    explicit = make_trainer(**config, sampler_dtype=None, rollout_lag=0, top_k=0, top_p=1.0)
    explicit.train(progress=False)
    assert default.sampler is None and not default.config.separate_sampler
    assert all(k["sampler"] is None and k["top_k"] == 0 and k["top_p"] == 1.0 for k in seen)
    assert all(b.rollout_logprobs is None for b in batches)
    assert params_sha256(explicit.model) == params_sha256(default.model)
    assert strip_time(explicit.history) == strip_time(default.history)


def test_a_float32_sampler_at_lag_0_scores_what_the_policy_scores():
    """sampler_dtype="float32", lag 0: a copy synced after every update draws the tokens; its
    rollout log-probs equal π_θold's to 1e-6 (the same weights in other memory: MKL rounds by
    alignment, a few float32 ulps), at every step, after the syncs too."""
    trainer = make_trainer(steps=3, lr=1e-2, num_updates=2, sampler_dtype="float32")
    assert trainer.sampler is not None and trainer.sampler.model is not trainer.model
    batches = keep_batches(trainer)
    trainer.train(progress=False)
    assert len(batches) == 3
    for batch in batches:
        on = batch.completion_mask.bool()
        torch.testing.assert_close(batch.rollout_logprobs[on], batch.old_logprobs[on], rtol=0, atol=1e-6)
    assert params_sha256(trainer.sampler.model) == params_sha256(trainer.model)  # synced after the last update


def test_a_lagged_sampler_holds_the_policys_weights_of_k_updates_ago():
    """rollout_lag = 3, two updates per step: the rollout of step s comes from θ_{2(s−1)−3}
    (θ_0 while fewer than 3 updates have happened).  Each batch's rollout log-probs are what a
    saved copy of those weights scores for the same completions (to 1e-6); once the policy has
    moved (step 2 on) they differ from π_θold's."""
    trainer = make_trainer(steps=4, lr=1e-2, beta=0.0, num_minibatches=2, rollout_lag=3)
    assert trainer.sampler.dtype == torch.float32  # the policy's dtype: no sampler_dtype given
    snapshots = [{n: w.clone() for n, w in trainer.model.state_dict().items()}]  # θ_0
    updated = trainer.sampler.updated

    def record():
        snapshots.append({n: w.clone() for n, w in trainer.model.state_dict().items()})
        updated()

    trainer.sampler.updated = record
    batches = keep_batches(trainer)
    trainer.train(progress=False)
    assert len(snapshots) == 1 + 4 * 2 and len(trainer.sampler.queue) == 3
    tau = trainer.config.temperature
    for step, batch in enumerate(batches, start=1):
        lagged = build_model(build_tokenizer(), SMALL, seed=1)
        lagged.load_state_dict(snapshots[max(0, 2 * (step - 1) - 3)])
        on = batch.completion_mask.bool()
        expected = score(lagged.eval(), batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                         batch.completion_mask, tau)
        torch.testing.assert_close(batch.rollout_logprobs[on], expected[on], rtol=0, atol=1e-6)
        gap = (batch.rollout_logprobs - batch.old_logprobs)[on].abs().max().item()
        assert (gap > 1e-3) == (step >= 2), (step, gap)  # step 1: no update yet, θ_0 = θ_old


def test_a_bfloat16_sampler_differs_a_little_and_training_stays_finite():
    """sampler_dtype="bfloat16": the sampler's log-probs differ from π_θold's by a small nonzero
    amount (bfloat16 weights and logits), the rollout correction sees it, and training is finite."""
    trainer = make_trainer(steps=3, lr=1e-2, beta=0.04, num_updates=2, sampler_dtype="bfloat16",
                           rollout_correction="token_truncate", top_p=0.9)
    assert {p.dtype for p in trainer.sampler.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    batches = keep_batches(trainer)
    trainer.train(progress=False)
    for batch in batches:
        on = batch.completion_mask.bool()
        gap = (batch.rollout_logprobs - batch.old_logprobs)[on].abs()
        assert 0 < gap.max() < 0.1 and gap.mean() < 0.02
    for h in trainer.history:
        assert all(v is None or math.isfinite(v) for k, v in h.items() if k != "symptoms")  # codes, not numbers
        assert h["sampling_logp_difference_mean"] > 0 and h["grad_norm"] is not None


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_resume_of_a_lagged_run_is_exact(tmp_path, dtype):
    """rollout_lag = 3 with two updates per step: stopped after 2 steps the sampler holds θ_1 and
    θ_2, θ_3, θ_4 wait in its queue; the checkpoint keeps them (safetensors, and a
    ``weights_only`` state), and the resumed run equals the unbroken one."""
    config = dict(steps=5, lr=3e-3, beta=0.04, num_minibatches=2, rollout_lag=3, sampler_dtype=dtype)
    straight = make_trainer(**config)
    straight.train(progress=False)
    first = make_trainer(**config)
    first.train(until=2, checkpoint_dir=tmp_path, progress=False)
    torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert (tmp_path / SAMPLER_FILE).exists() and len(first.sampler.queue) == 3
    resumed = make_trainer(**config)
    resumed.load_checkpoint(tmp_path)
    resumed.train(progress=False)
    assert params_sha256(resumed.model) == params_sha256(straight.model)
    assert params_sha256(resumed.sampler.model) == params_sha256(straight.sampler.model)
    assert strip_time(resumed.history) == strip_time(straight.history)


def test_a_lora_policys_lagged_sampler_shares_the_base_and_queues_the_adapter(tmp_path):
    """A LoRA policy sampled in its own dtype: the sampler's frozen base weights are the policy's
    own tensors (no copy), only the adapter is queued and checkpointed, and resume is exact."""
    import safetensors.torch

    def lora_trainer():
        tokenizer = build_tokenizer()
        base = models.random_model(models.qwen25_05b_config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # peft draws A from the global RNG: the same adapter in every run
            policy = models.prepare_for_training(base, lora_rank=2)
        return make_trainer(policy, steps=3, lr=1e-2, rollout_lag=1)

    straight = lora_trainer()
    policy, sampler = dict(straight.model.named_parameters()), dict(straight.sampler.model.named_parameters())
    assert all((sampler[n] is p) == (not p.requires_grad) for n, p in policy.items())
    straight.train(progress=False)
    first = lora_trainer()
    first.train(until=2, checkpoint_dir=tmp_path, progress=False)
    adapter = {n for n, p in first.model.named_parameters() if p.requires_grad}
    saved = safetensors.torch.load_file(str(tmp_path / SAMPLER_FILE))
    assert set(saved) == {f"held.{n}" for n in adapter} | {f"queue.0.{n}" for n in adapter}
    resumed = lora_trainer()
    resumed.load_checkpoint(tmp_path)
    resumed.train(progress=False)
    assert params_sha256(resumed.model) == params_sha256(straight.model)
    assert strip_time(resumed.history) == strip_time(straight.history)


def test_dynamic_sampling_carries_rollout_logprobs():
    """The groups dynamic sampling keeps, from several rollouts, keep their rollout log-probs:
    the sampler's scores of the kept completions (to 1e-5: the re-padded batch runs in other
    shapes)."""
    trainer = make_trainer(dynamic_sampling=True, max_sampling_rounds=3, sampler_dtype="float32")
    with trainer.own_rng():
        batch, _, _, metrics = trainer.sample_batch()
    assert batch.rollout_logprobs.shape == batch.completion_ids.shape
    assert metrics["groups_sampled"] > 4, metrics["groups_sampled"]  # groups of several rollouts, re-padded
    on = batch.completion_mask.bool()
    expected = score(trainer.sampler.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                     batch.completion_mask, trainer.config.temperature)
    torch.testing.assert_close(batch.rollout_logprobs[on], expected[on], rtol=0, atol=1e-5)


def test_truncation_and_rollout_options_reach_the_loss(monkeypatch):
    """top_k / top_p reach the rollout and the update's forward pass; the micro-batch's rollout
    log-probs and the rollout-correction options reach ``grpo_loss``.  Scored under the same
    truncation, the first update's ratio is exactly 1 (π_θ = π_θold)."""
    from minigrpo import trainer as trainer_module

    seen = {"loss": [], "forward": []}
    real_loss, real_forward = trainer_module.grpo_loss, trainer_module.completion_logprobs
    monkeypatch.setattr(trainer_module, "grpo_loss", lambda *a, **k: seen["loss"].append((a, k)) or real_loss(*a, **k))
    monkeypatch.setattr(trainer_module, "completion_logprobs",
                        lambda *a, **k: seen["forward"].append(k) or real_forward(*a, **k))
    monkeypatch.setattr(GRPOTrainer, "single_update", property(lambda self: False))  # π_θold from the rollout
    trainer = make_trainer(steps=1, lr=1e-2, temperature=0.7, top_k=5, top_p=0.8, sampler_dtype="bfloat16",
                           rollout_correction="sequence_mask", rollout_ratio_min=0.5, rollout_ratio_max=2.0,
                           off_policy_mask_threshold=0.4, rows_per_pass=8)
    h = trainer.train_step()
    assert all(k == {"top_k": 5, "top_p": 0.8} for k in seen["forward"])
    assert len(seen["loss"]) == 3  # two micro-batches of 8 rows, then the whole batch's metrics
    for args, kwargs in seen["loss"]:
        assert kwargs["rollout_logprobs"].shape == args[0].shape
        assert {k: kwargs[k] for k in ("rollout_correction", "rollout_ratio_min", "rollout_ratio_max",
                                       "off_policy_mask_threshold")} == {
            "rollout_correction": "sequence_mask", "rollout_ratio_min": 0.5, "rollout_ratio_max": 2.0,
            "off_policy_mask_threshold": 0.4}
    assert h["ratio_min"] == h["ratio_max"] == 1.0
