"""``GRPOConfig``: every hyperparameter of a GRPO run, its default and what it means.

The loop it steers is ``minigrpo.trainer``; every value is checked when the config is built,
so a bad choice fails before the first rollout.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from minigrpo.advantages import BASELINES, SCALES
from minigrpo.logprobs import check_truncation
from minigrpo.losses import KL_ESTIMATORS, LOSS_TYPES, RATIO_LEVELS, SURROGATES, check_rollout_options
from minigrpo.metrics import METRICS
from minigrpo.rewards import exact_match_reward

RewardFunc = Callable[[str, str], float]
"""r(completion, answer) -> float"""

LR_SCHEDULES = ("constant", "linear", "cosine")
SAMPLER_DTYPES = ("bfloat16", "float16", "float32")
"""The dtypes a separate sampler may hold its weights in (``sampler_dtype``), torch's names."""
OVERLONG_PENALTY = "overlong_penalty"
"""The reward part DAPO's soft overlong penalty is logged as (``reward_overlong_penalty``):
no reward function may take the name."""


@dataclass
class GRPOConfig:
    """Every GRPO hyperparameter, its default and what it means (defaults: the tiny world).
    Every value is checked when the config is built."""

    # --- the expectation: prompts q ~ P(Q) and groups {o_i} ~ π_θold(O|q)
    steps: int = 100
    """number of GRPO steps (one rollout + its updates each); the schedule's horizon"""
    prompts_per_step: int = 16
    """P, prompts q per step, summed over all ranks; typical 8–64"""
    group_size: int = 8
    """G, completions sampled per prompt; typical 4–16"""
    temperature: float = 1.0
    """τ: completions are drawn from softmax(logits / τ), and every log-prob (ratio, KL, entropy) is of that distribution; 0.6–1.0"""
    max_new_tokens: int = 4
    """L_max, the longest completion ``|o_i|`` in tokens (EOS included); also Dr. GRPO's constant ``max_len``"""

    # --- rewards and advantages
    reward_funcs: tuple[RewardFunc, ...] = (exact_match_reward,)
    """the reward functions r_k(completion, answer)"""
    reward_weights: tuple[float, ...] = (1.0,)
    """w_k, the reward is r = Σ_k w_k·r_k; one weight per reward function"""
    accuracy_reward: RewardFunc = exact_match_reward
    """the reward function whose value 1.0 counts as correct in held-out evaluation"""
    shuffle_rewards: bool = False
    """the control: permute rewards at random within the batch, cutting them from completions"""
    advantage_scale: str = "group"
    """Â's denominator (``scale`` of ``group_advantages``): "group" (std of the group), "batch" (std of the batch), "none" (Dr. GRPO)"""
    normalize_each_reward: bool = False
    """with several reward functions: normalise each within its group, then sum w_k·Â_k, instead of normalising the sum Σ_k w_k·r_k"""
    advantage_baseline: str = "mean"
    """b_i, subtracted from r_i (``baseline`` of ``group_advantages``): "mean" of the group (GRPO, r_i included) or "leave_one_out" (RLOO: the other G − 1)"""
    overlong_cache: int = 0
    """L_cache of DAPO's soft overlong punishment: past max_new_tokens − L_cache tokens the reward falls linearly, by 1 at the limit; 0: off"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal and roll out more prompts until the step has its prompts_per_step groups"""
    max_sampling_rounds: int = 4
    """the most rollouts one step draws with dynamic_sampling; after them it trains on the groups it has (all of the first rollout if none has signal)"""

    # --- the loss L_PG + β·L_KL − α·H
    num_updates: int = 1
    """μ, optimisation passes over each rollout; 1–4 (μ = 1 with one mini-batch: ρ ≡ 1, no clipping happens)"""
    num_minibatches: int = 1
    """mini-batches per pass, each a random set of whole groups, one optimiser step each; must divide each rank's prompts; 1–8"""
    beta: float = 0.04
    """β, weight of the KL loss to the frozen reference; 0–0.1 (0: no reference model kept)"""
    alpha: float = 0.0
    """α, weight of the entropy bonus (minimising −α·H raises entropy); 0 in DeepSeekMath, DAPO and TRL's default"""
    eps_low: float = 0.2
    """ε_low, the ratio is clipped below at 1 − ε_low; 0.1–0.3"""
    eps_high: float | None = None
    """ε_high, clipped above at 1 + ε_high; None means ε_low (DAPO's clip-higher: 0.28), or under CISPO 4 (a cap of 5, ``losses.CISPO_EPS_HIGH``)"""
    loss_type: str = "grpo"
    """token aggregation: "grpo" (per-sequence mean), "dapo" (token mean), "dr_grpo" (÷ N·max_new_tokens); N and the token count are the whole optimiser batch's, over micro-batches and ranks"""
    ratio_level: str = "token"
    """"token": ρ per token (GRPO); "sequence": one length-normalised ρ per completion (GSPO)"""
    kl_estimator: str = "k3"
    """Schulman's estimator of KL(π_θ‖π_ref) per token: "k1", "k2" or "k3" (the paper's)"""
    kl_bias_correction: bool = False
    """weight each token's KL estimate by its ratio ρ (DeepSeek-V3.2; TRL's use_bias_correction_kl): with token ratios, each token's gradient becomes that of KL(π_θ‖π_ref) at its position (not with ratio_level="sequence")"""
    surrogate: str = "clip"
    """the per-token policy loss: "clip" (PPO/GRPO) or "cispo" (MiniMax-M1: a capped, stop-gradient weight ρ ≤ 1 + ε_high; every token keeps its gradient)"""
    mask_truncated: bool = False
    """overlong filtering (DAPO): completions cut at max_new_tokens, with no EOS, are masked out of the loss"""
    rollout_correction: str | None = None
    """weigh the policy gradient by w = π_old/π_rollout (TRL's vllm_importance_sampling_mode): None (off), "token_truncate"/"sequence_truncate" (w clamped to [C_min, C_max]) or "token_mask"/"sequence_mask" (w = 0 outside; TRL's default "sequence_mask")"""
    rollout_ratio_min: float | None = None
    """C_min > 0, lower bound on w (TRL's vllm_importance_sampling_clip_min); None: none (TRL's default); e.g. 0.5"""
    rollout_ratio_max: float | None = 3.0
    """C_max > 0, upper bound on w (TRL's vllm_importance_sampling_clip_max); None: none; typical 2–10 (TRL: 3)"""
    off_policy_mask_threshold: float | None = None
    """δ, DeepSeek-V3.2's off-policy mask (TRL's off_policy_mask_threshold): no policy gradient for o_i with Â < 0 and mean log(π_rollout/π_θ) > δ; None: off; e.g. 0.5"""

    # --- the sampler π_rollout: what draws the completions
    top_k: int = 0
    """k of top-k sampling: only the k likeliest tokens (after ÷ τ) are drawn, and every log-prob (π_rollout, π_old, π_θ, π_ref) and the entropy are of that truncated, renormalised law; 0: off (Qwen2.5-Instruct's card: 20)"""
    top_p: float = 1.0
    """p of top-p (nucleus) sampling, after top-k: the fewest likeliest tokens holding mass ≥ p are drawn, all log-probs of that law; 1: off; typical 0.8–0.95"""
    sampler_dtype: str | None = None
    """None: the policy samples itself; "bfloat16", "float16" or "float32": a separate copy in that dtype samples and scores ``rollout_logprobs``, its weights synced after every optimiser step, as an inference engine's are"""
    rollout_lag: int = 0
    """k, staleness: the sampler holds the policy's weights of k optimiser updates ago (μ × num_minibatches updates per step; the initial weights until k have happened), as in asynchronous RL; k > 0 means a separate sampler (in the policy's dtype unless ``sampler_dtype``); 0–4"""

    # --- the optimiser (AdamW)
    lr: float = 1e-4
    """η, peak learning rate; tiny model 3e-5–2e-4, 0.5B model with LoRA 1e-5–1e-4, full fine-tuning 1e-6–5e-6"""
    lr_schedule: str = "constant"
    """after warm-up: "constant", "linear" or "cosine" decay to 0 at ``steps``"""
    warmup_steps: int = 0
    """steps of linear learning-rate warm-up from 0; 0–10% of steps"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay; 0–0.1"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm to this (> 0); None: no clipping (the norm is still logged)"""

    # --- evaluation and bookkeeping
    eval_every: int = 25
    """greedy held-out evaluation every this many steps (and before the first, and at the end); 0: before and at the end only"""
    eval_size: int = 500
    """number of held-out problems evaluated (the first ones of the held-out list)"""
    eval_max_new_tokens: int | None = None
    """token limit of evaluation's greedy completions; None: ``max_new_tokens``"""
    eval_batch_size: int = 512
    """prompts per greedy generation call during evaluation"""
    rows_per_pass: int | None = None
    """sequences per forward pass, in the no-grad scoring passes and the update (gradient accumulation over micro-batches: the same gradient as one pass); with a shared prefix, rounded down to whole groups (at least one); None: all at once"""
    shared_prefill: bool = False
    """run each prompt once per group and copy its KV cache to its G rows, in sampling, scoring and (without
    gradient checkpointing, which keeps no cache) the update's forward pass: the same function, far less
    compute for long prompts (``rollout.prefix_cache``)"""
    checkpoint_every: int = 0
    """write a checkpoint every this many steps (and at the end) when a directory is given"""
    seed: int = 0
    """seeds prompt sampling, generation and mini-batch order (rank r uses seed + r)"""

    def __post_init__(self):
        self.reward_funcs, self.reward_weights = tuple(self.reward_funcs), tuple(self.reward_weights)
        if not self.reward_funcs or not all(callable(f) for f in (*self.reward_funcs, self.accuracy_reward)):
            raise ValueError("reward_funcs and accuracy_reward must be callables r(completion, answer)")
        if len(self.reward_funcs) != len(self.reward_weights):
            raise ValueError("reward_funcs and reward_weights must have the same length")
        if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"reward_weights must be finite numbers, got {self.reward_weights!r}")
        for name, choices in (("advantage_scale", SCALES), ("advantage_baseline", BASELINES), ("loss_type", LOSS_TYPES),
                              ("ratio_level", RATIO_LEVELS), ("kl_estimator", KL_ESTIMATORS), ("surrogate", SURROGATES),
                              ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("shuffle_rewards", "dynamic_sampling", "kl_bias_correction", "mask_truncated", "shared_prefill",
                     "normalize_each_reward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "num_updates", "num_minibatches",
                     "eval_size", "eval_batch_size", "eval_max_new_tokens", "rows_per_pass", "max_sampling_rounds"):
            check_number(self, name, int, low=1, optional=name in ("eval_max_new_tokens", "rows_per_pass"))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            check_number(self, name, int, low=0)
        check_number(self, "overlong_cache", int, low=0, high=self.max_new_tokens)
        if self.advantage_baseline == "leave_one_out" and self.group_size < 2:
            raise ValueError("advantage_baseline='leave_one_out' needs group_size >= 2")
        if self.surrogate == "cispo" and self.ratio_level != "token":
            raise ValueError("surrogate='cispo' needs ratio_level='token'")
        check_rollout_options(self.rollout_correction, self.rollout_ratio_min, self.rollout_ratio_max,
                              self.off_policy_mask_threshold)
        check_truncation(self.top_k, self.top_p)
        if self.sampler_dtype is not None and self.sampler_dtype not in SAMPLER_DTYPES:
            raise ValueError(f"sampler_dtype must be None or one of {SAMPLER_DTYPES}, got {self.sampler_dtype!r}")
        check_number(self, "rollout_lag", int, low=0)
        for name in ("beta", "alpha", "weight_decay", "eps_high"):
            check_number(self, name, float, low=0, optional=name == "eps_high")
        check_number(self, "eps_low", float, low=0, high=1)
        for name in ("temperature", "lr", "max_grad_norm"):  # a norm of 0 would zero every gradient
            check_number(self, name, float, low=0, strict=True, optional=name == "max_grad_norm")
        if self.prompts_per_step % self.num_minibatches:  # a mini-batch holds whole groups
            raise ValueError(f"num_minibatches={self.num_minibatches} must divide prompts_per_step="
                             f"{self.prompts_per_step} (mini-batches are made of whole groups)")
        names = [f.__name__ for f in self.reward_funcs]
        clashes = [n for n in names if names.count(n) > 1 or f"reward_{n}" in METRICS or n == OVERLONG_PENALTY]
        if clashes:  # each is logged as reward_<name>: the names must be distinct and new
            raise ValueError(f"reward_funcs need distinct __name__s that are not logged metrics (nor "
                             f"{OVERLONG_PENALTY!r}, the overlong penalty's), got {clashes}")

    @property
    def separate_sampler(self) -> bool:
        """True when a copy of the policy samples (``models.Sampler``), not the policy itself: a
        ``sampler_dtype`` is given or ``rollout_lag`` > 0.  The one place this is decided."""
        return self.sampler_dtype is not None or self.rollout_lag > 0

    @property
    def eval_tokens(self) -> int:
        """The token limit evaluation uses."""
        return self.eval_max_new_tokens or self.max_new_tokens

    def to_dict(self) -> dict:
        """The config as JSON-ready values; reward functions by name."""
        values = dataclasses.asdict(self)
        values["reward_funcs"] = [f.__name__ for f in self.reward_funcs]
        values["accuracy_reward"] = self.accuracy_reward.__name__
        return values


def check_number(config, name: str, kind: type, low: float, high: float = math.inf,
                  strict: bool = False, optional: bool = False) -> None:
    """``config.name`` is a finite ``kind`` (int, or float accepting ints) in [low, high), or
    (low, high) when ``strict``; None allowed when ``optional``."""
    value = getattr(config, name)
    if value is None and optional:
        return
    allowed = numbers.Integral if kind is int else numbers.Real
    ok = isinstance(value, allowed) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if strict else low <= value) or not value < high:
        bounds = f"{'(' if strict else '['}{low}, {high})"
        raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'} in {bounds}, got {value!r}")
