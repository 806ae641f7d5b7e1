"""minigrpo's loss against TRL's: the same inputs give the same loss and the same gradients.

TRL 1.16.0's ``GRPOTrainer`` is built for real (a tiny Qwen2 model and a character tokenizer,
saved to a folder and loaded from there, no hub).  One fixed batch (prompts, completions of
different lengths, advantages from ``minigrpo.group_advantages``, old log-probs pushed away from
the current ones so that clipping bites, reference log-probs for the KL term) goes through

    TRL:      trainer.compute_loss(model, inputs)   (its ``_compute_loss``, fused LM head)
    minigrpo: model logits / τ -> token_logprobs -> grpo_loss

and both losses, the gradients of every model parameter, and the logged KL and clip fractions
must agree, for every minigrpo loss type, β = 0 and β > 0, token and sequence (GSPO) ratios,
and ε_high = ε_low or ε_high > ε_low.  TRL's settings come from minigrpo's own translation,
``minigrpo.trl_bridge.trl_grpo_kwargs``, so the test checks that too; minigrpo's log-probs come
from ``minigrpo.rollout.completion_logprobs``, the trainer's own forward pass.  TRL's "dapo",
which at one micro-batch per generation is the same token mean as its "bnpo", is checked
against minigrpo's "dapo" as well.  Run: ``pytest tests/test_trl_equivalence.py``.

The rollout correction and the off-policy mask are checked the same way.  For the mask on the
old log-probs, ``_batch`` serves.  For the correction (TRL's vLLM importance sampling), TRL must
compute w itself: ``_sampled_batch`` runs TRL's own ``_generate_and_score_completions`` with its
``_generate`` replaced by fixed completions and the sampler's log-probs (as vLLM returns them,
one NaN among them), and ``use_vllm`` switched on, the only condition TRL puts on the
correction.  Then both losses, gradients and TRL's ``sampling/…`` metrics must agree for all four
modes, with and without the mask, and for the mask alone on the sampler's log-probs.

How TRL 1.16 aggregates (``GRPOTrainer._compute_loss``; B sequences, mask m, per-token loss x
that already includes β·k3 KL; one process, no gradient accumulation):

    TRL "grpo":    mean_i (Σ_t m·x / max(Σ_t m, 1))             -> minigrpo "grpo"
    TRL "bnpo":    Σ m·x / max(Σ m, 1) over the micro-batch      -> minigrpo "dapo"
    TRL "dapo":    Σ m·x / (num_items_in_batch / processes
                            · grad_accum / steps_per_generation) -> minigrpo "dapo"
                   (num_items_in_batch = Σ m over the whole generation batch; with one process
                   and one micro-batch per generation it is Σ m of this batch: a token mean)
    TRL "dr_grpo": Σ m·x / (B · max_completion_length)          -> minigrpo "dr_grpo",
                                                                    max_len=max_completion_length

TRL adds β·KL to the per-token loss before aggregating; minigrpo aggregates the two terms
separately.  Aggregation is linear, so the sums agree.  TRL's default
``use_bias_correction_kl=True`` multiplies the KL by the importance ratio (DeepSeek-V3.2);
minigrpo's KL is the DeepSeekMath k3 term, so the test sets it to False.  TRL divides the logits
by its ``temperature`` before the log-softmax; minigrpo receives logits / τ.  TRL has no entropy
bonus in minigrpo's form (its ``entropy_coef`` is a token mean for every loss type), so α stays 0.
TRL's fused LM head accumulates in float32 whatever the model dtype, so the test runs in float32.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("trl")
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")]

import datasets  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import minigrpo as mg  # noqa: E402
from minigrpo.rollout import completion_logprobs  # noqa: E402
from minigrpo.config import GRPOConfig as MinigrpoConfig  # noqa: E402
from minigrpo.trl_bridge import trl_grpo_kwargs  # noqa: E402

SYMBOLS = ["<pad>", "<eos>", "<unk>", *"0123456789+="]
GROUP_SIZE = 3  # G completions per prompt
PROMPTS = 2
N = PROMPTS * GROUP_SIZE  # sequences in the batch
PROMPT_LEN = 4
COMPLETION_LEN = 6  # T, the padded completion width
MAX_COMPLETION_LENGTH = 8  # TRL's Dr. GRPO constant; ≠ T on purpose
LENGTHS = [6, 4, 1, 5, 3, 6]  # row 2 keeps only its first token
REWARDS = [1.0, 0.0, 0.5, 0.2, 0.9, 0.0]
TEMPERATURE = 0.7
EPS_LOW = 0.2
OLD_DELTA = 0.3  # δ of the off-policy mask on _batch's old log-probs: drops rows 1 and 5 (Â < 0), keeps row 3
ROLLOUT_BOUNDS = dict(rollout_ratio_min=0.5, rollout_ratio_max=2.0)  # [C_min, C_max] of w in _sampled_batch
ROLLOUT_DELTA = 0.05  # δ on _sampled_batch's rollout log-probs: drops row 3 (Â < 0), keeps rows 1 and 5

CONFIGS = [
    dict(loss_type=loss_type, beta=beta, ratio_level=level, eps_high=eps_high)
    for loss_type, beta, level, eps_high in itertools.product(
        mg.losses.LOSS_TYPES, [0.0, 0.04], ["token", "sequence"], [None, 0.28]
    )
] + [dict(loss_type="dapo", beta=beta, ratio_level="token", eps_high=None, trl_loss_type="dapo") for beta in (0.0, 0.04)
] + [dict(loss_type="dapo", beta=beta, ratio_level="token", eps_high=0.28, surrogate="cispo") for beta in (0.0, 0.04)
] + [dict(loss_type=loss_type, beta=0.04, ratio_level=level, eps_high=None, kl_bias_correction=True)
     for loss_type, level in itertools.product(["grpo", "dapo"], ["token", "sequence"])
] + [dict(loss_type=loss_type, beta=beta, ratio_level="token", eps_high=None, off_policy_mask_threshold=OLD_DELTA)
     for loss_type, beta in [("grpo", 0.04), ("dapo", 0.0), ("dr_grpo", 0.04)]
] + [dict(loss_type=loss_type, beta=0.04 * (threshold is None), ratio_level="token", eps_high=0.28, sampler=True,
          rollout_correction=mode, **ROLLOUT_BOUNDS, off_policy_mask_threshold=threshold)
     for (mode, loss_type), threshold in itertools.product(
         zip(mg.losses.ROLLOUT_CORRECTIONS, ["grpo", "dapo", "dr_grpo", "grpo"]), [None, ROLLOUT_DELTA])
] + [dict(loss_type="dapo", beta=0.04, ratio_level="token", eps_high=None, sampler=True,
          rollout_correction="sequence_mask"),  # TRL's default mode and bounds [None, 3]
     dict(loss_type="grpo", beta=0.04, ratio_level="token", eps_high=None, sampler=True, num_updates=2,
          off_policy_mask_threshold=ROLLOUT_DELTA)]  # the mask on the sampler's log-probs, no correction
# (μ = 2: without a correction TRL computes π_old only when it can differ from π_θ)


def _config_id(config: dict) -> str:
    eps = "sym" if config["eps_high"] is None else f"eh{config['eps_high']}"
    trl = f"-trl_{config['trl_loss_type']}" if "trl_loss_type" in config else ""
    extra = "-cispo" * (config.get("surrogate") == "cispo") + "-klcorr" * config.get("kl_bias_correction", False)
    extra += f"-{config['rollout_correction']}" if config.get("rollout_correction") else ""
    extra += "-sampler" * config.get("sampler", False)
    extra += f"-opm{config['off_policy_mask_threshold']}" if config.get("off_policy_mask_threshold") is not None else ""
    return f"{config['loss_type']}{trl}-beta{config['beta']}-{config['ratio_level']}-{eps}{extra}"


def _minigrpo_config(config: dict) -> MinigrpoConfig:
    options = {k: v for k, v in config.items() if k not in ("trl_loss_type", "sampler")}
    return MinigrpoConfig(prompts_per_step=PROMPTS, group_size=GROUP_SIZE, max_new_tokens=MAX_COMPLETION_LENGTH,
                          temperature=TEMPERATURE, eps_low=EPS_LOW, **options)


def _tokenizer() -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer, built offline."""
    vocab = {symbol: i for i, symbol in enumerate(SYMBOLS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Qwen2 (2 layers, d=32, tied embeddings) and its tokenizer, saved to a folder.

    TRL rebuilds the reference model from ``config._name_or_path`` when β > 0, so the policy
    must come from a folder, not from memory.
    """
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(SYMBOLS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
    )
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    Qwen2ForCausalLM(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _trainer(model_dir: str, config: dict, output_dir: str) -> GRPOTrainer:
    kwargs = trl_grpo_kwargs(_minigrpo_config(config))
    kwargs["loss_type"] = config.get("trl_loss_type", kwargs["loss_type"])
    args = GRPOConfig(output_dir=output_dir, report_to=[], use_cpu=True, bf16=False, **kwargs)
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=lambda completions, **kwargs: REWARDS[: len(completions)],  # scored by _sampled_batch only
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4="]}),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    trainer.model.train()
    return trainer


def _completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """minigrpo's side: log π(o_t | q, o_<t) under the sampling law softmax(logits / τ), [N, T],
    from the trainer's own forward pass.  The TRL trainer has patched ``model.forward`` with its
    fused LM head; without ``fused_lm_head=True`` the call runs the model's own forward."""
    return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE)[0]


def _batch(model) -> dict:
    """TRL's ``inputs`` dict: left-padded prompts, right-padded completions, off-policy old
    log-probs (per-row shift plus per-token noise, so ratios leave [1 − ε, 1 + ε] at token and
    sequence level), reference log-probs for the KL term."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, len(SYMBOLS), (N, PROMPT_LEN), generator=g)
    prompt_mask = torch.ones(N, PROMPT_LEN, dtype=torch.long)
    prompt_mask[0, :2] = 0  # a shorter, left-padded prompt
    prompt_ids[prompt_mask == 0] = 0
    completion_mask = (torch.arange(COMPLETION_LEN) < torch.tensor(LENGTHS)[:, None]).long()
    completion_ids = torch.randint(3, len(SYMBOLS), (N, COMPLETION_LEN), generator=g)
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        logprobs = _completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    # sequence-level ratio exp(mean_t(logprobs − old)) = exp(shift): above 1 + ε where Â > 0 and
    # below 1 − ε where Â < 0 (clipped), except row 3 (inside) and row 4, whose tokens all have
    # ratio 1.246: clipped by ε_high = 0.2, not by ε_high = 0.28.  Other token ratios scatter.
    shift = torch.tensor([0.5, -0.5, 0.3, -0.15, 0.22, -0.35])[:, None]  # (N, 1)
    noise = 0.3 * torch.randn(N, COMPLETION_LEN, generator=g) * completion_mask
    noise = noise - noise.sum(-1, keepdim=True) / completion_mask.sum(-1, keepdim=True)
    noise[4] = 0.0
    old = (logprobs - shift + noise) * completion_mask  # TRL's log-probs are 0 on padding
    ref = (logprobs + 0.5 * torch.randn(N, COMPLETION_LEN, generator=g)) * completion_mask
    rewards = torch.tensor(REWARDS)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": mg.group_advantages(rewards, GROUP_SIZE),
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum().float(),
    }


def _sampled_batch(trainer: GRPOTrainer) -> dict:
    """TRL's ``inputs`` dict from TRL's own ``_generate_and_score_completions``, as if vLLM had
    sampled: ``_generate`` is replaced by one that returns fixed prompts, completions (LENGTHS)
    and the sampler's log-probs, log π_rollout = log π_old + noise (one NaN: a token the sampler
    gave no log-prob for).  TRL then computes π_old itself (on weights perturbed for the
    occasion, restored afterwards: π_θ ≠ π_old, so ratios leave [1 − ε, 1 + ε]), the rewards
    (REWARDS), the advantages, the reference log-probs, the rollout correction w and its
    ``sampling/…`` metrics."""
    model = trainer.model
    g = torch.Generator().manual_seed(2)
    prompt_ids = [torch.randint(3, len(SYMBOLS), (PROMPT_LEN - 2 * (i == 0),), generator=g).tolist() for i in range(N)]
    completion_ids = [torch.randint(3, len(SYMBOLS), (n,), generator=g).tolist() for n in LENGTHS]
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        prompt_mask = (torch.arange(PROMPT_LEN) >= torch.tensor([2] + [0] * (N - 1))[:, None]).long()
        padded_prompts = torch.zeros(N, PROMPT_LEN, dtype=torch.long)
        padded_prompts[prompt_mask.bool()] = torch.tensor([t for ids in prompt_ids for t in ids])
        completion_mask = (torch.arange(COMPLETION_LEN) < torch.tensor(LENGTHS)[:, None]).long()
        padded_completions = torch.zeros(N, COMPLETION_LEN, dtype=torch.long)
        padded_completions[completion_mask.bool()] = torch.tensor([t for ids in completion_ids for t in ids])
        old = _completion_logprobs(model, padded_prompts, prompt_mask, padded_completions, completion_mask)
    rollout = old + 0.7 * torch.randn(old.shape, generator=g)
    rollout_lists = [rollout[i, :n].tolist() for i, n in enumerate(LENGTHS)]
    rollout_lists[0][1] = float("nan")

    def generate(prompts):  # TRL's vLLM path returns these eight
        return prompt_ids, completion_ids, None, ["x"] * len(prompts), rollout_lists, {}, None, None

    trainer._generate, trainer.use_vllm = generate, True  # use_vllm: TRL applies the correction only then
    inputs = trainer._generate_and_score_completions([{"prompt": "?"}] * N)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    torch.testing.assert_close(inputs["advantages"], mg.group_advantages(torch.tensor(REWARDS), GROUP_SIZE))
    return inputs


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _trl_side(trainer: GRPOTrainer, inputs: dict):
    """TRL's loss (``compute_loss`` -> ``_compute_loss``), its gradients and its logged metrics."""
    model = trainer.model
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), _gradients(model), metrics


def _minigrpo_side(model, inputs: dict, config: dict):
    """minigrpo's ``grpo_loss`` on the same model and batch, with TRL's settings mapped over."""
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    logprobs = _completion_logprobs(model, *(inputs[key] for key in keys))
    c = _minigrpo_config(config)
    out = mg.grpo_loss(
        logprobs,
        inputs["old_per_token_logps"],
        inputs["advantages"],
        inputs["completion_mask"].float(),
        ref_logprobs=inputs["ref_per_token_logps"] if c.beta > 0 else None,
        beta=c.beta,
        eps_low=c.eps_low,
        eps_high=c.eps_high,
        loss_type=c.loss_type,
        ratio_level=c.ratio_level,
        max_len=c.max_new_tokens,  # as the trainer passes it
        surrogate=c.surrogate,
        kl_bias_correction=c.kl_bias_correction,
        rollout_logprobs=inputs.get("sampling_per_token_logps"),  # TRL's: NaN kept, 0 on padding
        rollout_correction=c.rollout_correction,
        rollout_ratio_min=c.rollout_ratio_min,
        rollout_ratio_max=c.rollout_ratio_max,
        off_policy_mask_threshold=c.off_policy_mask_threshold,
    )
    out.loss.backward()
    return out, _gradients(model)


@pytest.fixture(scope="module", params=CONFIGS, ids=_config_id)
def both(request, model_dir, tmp_path_factory) -> dict:
    """One TRL configuration: TRL's and minigrpo's losses, gradients and metrics on one batch."""
    config = request.param
    trainer = _trainer(model_dir, config, str(tmp_path_factory.mktemp("out")))
    inputs = _sampled_batch(trainer) if config.get("sampler") else _batch(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    trl_loss, trl_grads, trl_metrics = _trl_side(trainer, inputs)
    mg_out, mg_grads = _minigrpo_side(trainer.model, inputs, config)
    return {
        "config": config,
        "trl_loss": trl_loss,
        "trl_grads": trl_grads,
        "trl_metrics": trl_metrics,
        "mg_out": mg_out,
        "mg_grads": mg_grads,
    }


def test_clipping_is_active(both):
    """The batch is off-policy enough that TRL clips tokens on both sides, but not all of them:
    the comparison covers the clipped and the unclipped branch (for CISPO: capped weights)."""
    if both["config"].get("surrogate") == "cispo":
        assert 0 < both["trl_metrics"]["cispo_clip_ratio"] < 1
        return
    assert both["trl_metrics"]["clip_ratio/low_mean"] > 0
    assert both["trl_metrics"]["clip_ratio/high_mean"] > 0
    assert both["trl_metrics"]["clip_ratio/region_mean"] < 1


def test_same_loss(both):
    torch.testing.assert_close(both["mg_out"].loss.detach(), both["trl_loss"], rtol=1e-5, atol=1e-7)


def test_same_gradients(both):
    trl_grads, mg_grads = both["trl_grads"], both["mg_grads"]
    assert trl_grads.keys() == mg_grads.keys()
    assert any(g.abs().max() > 0 for g in trl_grads.values())
    for name, trl_grad in trl_grads.items():
        torch.testing.assert_close(
            mg_grads[name], trl_grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


CLIP_METRICS = {  # TRL's logged name -> minigrpo's
    "clip_ratio/low_mean": "clip_frac_low",
    "clip_ratio/high_mean": "clip_frac_high",
    "clip_ratio/region_mean": "clip_frac",
}


SAMPLING_METRICS = {  # TRL's logged name -> minigrpo's
    "sampling/sampling_logp_difference/mean": "sampling_logp_difference_mean",
    "sampling/sampling_logp_difference/max": "sampling_logp_difference_max",
    "sampling/importance_sampling_ratio/min": "importance_sampling_ratio_min",
    "sampling/importance_sampling_ratio/mean": "importance_sampling_ratio_mean",
    "sampling/importance_sampling_ratio/max": "importance_sampling_ratio_max",
}


def test_corrections_are_active(both):
    """Where a configuration corrects or masks, the batch makes it bite: the bounds change some
    weights but not all, the off-policy mask drops some completions with Â < 0 but not all."""
    config, metrics = both["config"], both["mg_out"].metrics
    if config.get("rollout_correction"):
        assert 0 < metrics["importance_sampling_out_of_bounds_frac"] < 1
    if config.get("off_policy_mask_threshold") is not None:
        assert metrics["off_policy_masked_frac"] == pytest.approx(1 / N if config.get("sampler") else 2 / N)
    if not config.get("rollout_correction") and config.get("off_policy_mask_threshold") is None:
        assert not set(metrics) & set(mg.losses.ROLLOUT_METRICS)


def test_same_metrics(both):
    """TRL's logged KL and clip fractions are minigrpo's token means.  At sequence level TRL
    counts clipped sequences, minigrpo clipped tokens, so clip fractions are compared at token
    level only.  With a rollout correction, TRL's ``sampling/…`` metrics are minigrpo's."""
    trl_metrics, mg_metrics = both["trl_metrics"], both["mg_out"].metrics
    pairs = {"kl": "kl_token_mean"} if both["config"]["beta"] > 0 else {}
    if both["config"].get("rollout_correction"):
        pairs.update(SAMPLING_METRICS)
    if both["config"].get("surrogate") == "cispo":
        # TRL counts the capped tokens with Â > 0 only; minigrpo every token whose weight the cap
        # changed, whatever Â's sign (the cap acts on both): a superset
        assert mg_metrics["clip_frac_high"] >= trl_metrics["cispo_clip_ratio"] - 1e-7
        assert mg_metrics["clip_frac_high"] > trl_metrics["cispo_clip_ratio"]  # Â < 0 tokens were capped too
    elif both["config"]["ratio_level"] == "token":
        pairs.update(CLIP_METRICS)
    for trl_key, mg_key in pairs.items():
        assert mg_metrics[mg_key] == pytest.approx(trl_metrics[trl_key], rel=1e-5, abs=1e-7), trl_key


def test_the_translation_builds_the_same_schedule_in_trl(tmp_path):
    """``trl_grpo_kwargs`` through TRL's own ``GRPOConfig``: one rollout of P·G completions,
    ``num_minibatches`` optimiser steps on it, μ passes, the schedule in optimiser steps."""
    c = MinigrpoConfig(num_updates=2, num_minibatches=4, warmup_steps=3, lr_schedule="cosine",
                       eps_high=0.28, loss_type="dapo")
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **trl_grpo_kwargs(c))
    assert args.generation_batch_size == c.prompts_per_step * c.group_size
    assert args.steps_per_generation == c.num_minibatches and args.num_iterations == c.num_updates
    assert args.max_steps == c.steps * 8 and args.warmup_steps == 3 * 8
    assert args.loss_type == "bnpo" and args.epsilon_high == 0.28 and args.lr_scheduler_type == "cosine"
    for unsupported in (dict(alpha=1e-3), dict(kl_estimator="k2"), dict(shuffle_rewards=True),
                        dict(advantage_baseline="leave_one_out"), dict(dynamic_sampling=True), dict(overlong_cache=2),
                        dict(top_k=50), dict(top_p=0.9)):
        with pytest.raises(ValueError, match="not translated to TRL"):
            trl_grpo_kwargs(MinigrpoConfig(**unsupported))
    c = MinigrpoConfig(surrogate="cispo", loss_type="dapo", eps_high=4.0, kl_bias_correction=True, mask_truncated=True)
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **trl_grpo_kwargs(c))
    assert args.loss_type == "cispo" and args.epsilon_high == 5.0  # TRL caps the weight at epsilon_high itself
    assert args.use_bias_correction_kl and args.mask_truncated_completions
    with pytest.raises(ValueError, match="cispo"):
        trl_grpo_kwargs(MinigrpoConfig(surrogate="cispo", loss_type="grpo"))


def test_the_translation_is_for_one_process(monkeypatch):
    """Under a launcher (WORLD_SIZE > 1) the translation refuses: TRL's batch sizes and its
    "bnpo" token mean are per process, so the same keywords would be another run."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one-process run; this is one of 2 processes"):
        trl_grpo_kwargs(MinigrpoConfig())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert trl_grpo_kwargs(MinigrpoConfig())["gradient_accumulation_steps"] == 1


def test_the_translation_of_the_rollout_correction(tmp_path):
    """The correction and the off-policy mask as TRL's ``vllm_importance_sampling_*`` and
    ``off_policy_mask_threshold``; none asked for: TRL's correction off (its default is on).  The
    two settings TRL's own config refuses (a truncation without bounds, C_min = C_max) raise
    before it is built."""
    def trl_config(**kwargs):
        return GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **kwargs)

    c = MinigrpoConfig(rollout_correction="token_mask", rollout_ratio_min=0.5, rollout_ratio_max=2.0,
                       off_policy_mask_threshold=0.5)
    args = trl_config(**trl_grpo_kwargs(c))
    assert args.vllm_importance_sampling_correction and args.vllm_importance_sampling_mode == "token_mask"
    assert (args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max) == (0.5, 2.0)
    assert args.off_policy_mask_threshold == 0.5
    args = trl_config(**trl_grpo_kwargs(MinigrpoConfig()))
    assert not args.vllm_importance_sampling_correction and args.off_policy_mask_threshold is None
    for bad in (dict(rollout_correction="token_truncate", rollout_ratio_max=None),
                dict(rollout_correction="sequence_mask", rollout_ratio_min=2.0, rollout_ratio_max=2.0)):
        with pytest.raises(ValueError, match="not translated to TRL"):
            trl_grpo_kwargs(MinigrpoConfig(**bad))
        with pytest.raises(ValueError, match="vllm_importance_sampling_clip"):  # TRL refuses it too
            trl_config(vllm_importance_sampling_mode=bad["rollout_correction"],
                       vllm_importance_sampling_clip_min=bad.get("rollout_ratio_min"),
                       vllm_importance_sampling_clip_max=bad["rollout_ratio_max"])


def test_soft_overlong_penalty_is_trls():
    """minigrpo's penalty on token counts against TRL's reward function on token lists."""
    from trl.rewards import get_soft_overlong_punishment

    from minigrpo.advantages import soft_overlong_penalty

    lengths = torch.tensor([1, 10, 11, 15, 19, 20])
    trl_values = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=10)(
        completion_ids=[[7] * int(n) for n in lengths])
    torch.testing.assert_close(soft_overlong_penalty(lengths, 20, 10), torch.tensor(trl_values, dtype=torch.float32))
