"""The GRPO loss, term by term.

    L_GRPO(θ) = L_PG(θ) + β · L_KL(θ, θ_ref) − α · H(π_θ)

Each term is one small function whose docstring quotes its formula; ``grpo_loss`` composes them.
Tensors are [N, T]: N completions (prompts × G, consecutive blocks of G are one group), T
completion positions; ``mask`` is 1 on completion tokens and 0 on padding.

Padding is removed at the door: ``grpo_loss`` replaces every padded position of its per-token
inputs by 0 before computing anything, so whatever sits there (garbage, ±inf, nan) never reaches
the loss or a gradient.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
RATIO_LEVELS = ("token", "sequence")
SURROGATES = ("clip", "cispo")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
CISPO_EPS_HIGH = 4.0
"""CISPO's default ε_high: the weight is capped at 1 + 4 = 5, ScaleRL's ε_max = 5 (Khatri et al.,
2025, arXiv:2510.13786), the value TRL 1.16's ``GRPOConfig`` recommends for ``loss_type="cispo"``
(whose ``epsilon_high`` is the cap itself)."""


# --------------------------------------------------------------------------- validation


def check_mask(mask: torch.Tensor, shape: torch.Size, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as a bool tensor; it must have ``shape`` and only 0/1 values."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of 0/1 values")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1 (bool, integer or float tensor)")
    return mask != 0


def _check_tensor(x: torch.Tensor, name: str, shape: torch.Size | None = None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _check_2d(x: torch.Tensor, name: str) -> None:
    _check_tensor(x, name)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, T] with N >= 1, got {tuple(x.shape)}")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_coef(value: float, name: str, upper: float = math.inf) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 <= value < upper:
        raise ValueError(f"{name} must be a finite float in [0, {upper}), got {value!r}")


def check_rollout_options(rollout_correction: str | None, rollout_ratio_min: float | None,
                          rollout_ratio_max: float | None, off_policy_mask_threshold: float | None) -> None:
    """The rollout-correction settings (``grpo_loss``'s and ``GRPOConfig``'s, same names): a mode
    in ``ROLLOUT_CORRECTIONS`` or None; each bound None or a finite number > 0, C_min ≤ C_max;
    δ_off (``off_policy_mask_threshold``) None or finite.  ``ValueError`` naming the argument otherwise."""
    if rollout_correction is not None:
        _check_choice(rollout_correction, ROLLOUT_CORRECTIONS, "rollout_correction")
    for name, value in (("rollout_ratio_min", rollout_ratio_min), ("rollout_ratio_max", rollout_ratio_max)):
        ok = value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                               and math.isfinite(value) and value > 0)
        if not ok:
            raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    if rollout_ratio_min is not None and rollout_ratio_max is not None and rollout_ratio_min > rollout_ratio_max:
        raise ValueError(f"rollout_ratio_min ({rollout_ratio_min}) must be <= rollout_ratio_max ({rollout_ratio_max})")
    delta = off_policy_mask_threshold
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, numbers.Real)
                              or not math.isfinite(delta)):
        raise ValueError(f"off_policy_mask_threshold must be None or a finite number, got {delta!r}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bfloat16/float16 → float32; float32 and float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# --------------------------------------------------------------------------- the terms


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from tokens sampled from π_θ (Schulman, 2020).

    With d = log π_ref(o_t) − log π_θ(o_t):

        k1 = −d                  unbiased, high variance, can be negative
        k2 = d² / 2              biased, ≥ 0; low variance while π_θ and π_ref are close
        k3 = exp(d) − d − 1      unbiased, ≥ 0   (DeepSeekMath GRPO)

    k3's variance contains χ²(π_ref ‖ π_θ) = E_π_θ[(π_ref/π_θ)²] − 1: low while the two are close,
    infinite where the reference's tails are heavy enough (book, chapter 4).

    ``ref_logprobs`` is the frozen reference: it is detached.  Same shape in, same shape out.
    No clamping: ``|d| > 88`` overflows exp in float32, as the formula does.
    """
    _check_tensor(logprobs, "logprobs")
    _check_tensor(ref_logprobs, "ref_logprobs", logprobs.shape)
    _check_choice(estimator, KL_ESTIMATORS, "estimator")
    d = ref_logprobs.detach() - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return d.square() / 2
    return torch.expm1(d) - d  # exp(d) − 1 − d, accurate for small d


def aggregation_normalizer(mask: torch.Tensor, loss_type: str = "grpo", max_len: int | None = None) -> int:
    """The denominator D that ``aggregate`` divides by, for the completions of ``mask`` [N, T]:

        "grpo":    N              (sequences; each brings its own per-token mean)
        "dapo":    Σ_i Σ_t m      (completion tokens)
        "dr_grpo": N · max_len    (max_len defaults to T)

    D adds up over pieces of a batch, so the denominator of a whole optimiser batch split into
    micro-batches and ranks is the sum of the pieces' D (the trainer sums it over all of them,
    then passes it to every piece as ``normalizer``: the same gradient however the batch is split).
    """
    m = check_mask(mask, mask.shape)
    _check_choice(loss_type, LOSS_TYPES, "loss_type")
    n, t = m.shape
    if loss_type == "grpo":
        return n
    if loss_type == "dapo":
        return int(m.sum())
    return n * _max_len(max_len, t)


def _max_len(max_len: int | None, t: int) -> int:
    if max_len is None:
        return t
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < max(t, 1):
        raise ValueError(f"max_len must be an int >= T = {t} (the padded length), got {max_len!r}")
    return int(max_len)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo", max_len: int | None = None,
    *, normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token term x_{i,t} [N, T] to a scalar, counting only tokens with m_{i,t} = 1.

        "grpo"    (DeepSeekMath):  1/N Σ_i [ Σ_t m·x / max(Σ_t m, 1) ]   every sequence weighs the same
        "dapo"    (DAPO):          Σ_i Σ_t m·x / max(Σ_i Σ_t m, 1)      every token weighs the same
        "dr_grpo" (Dr. GRPO):      Σ_i Σ_t m·x / (N · max_len)          constant when max_len is

    "grpo" gives a token of a short completion more weight than one of a long completion (the
    length bias Dr. GRPO points out).  ``max_len`` is the generation budget L_max; it must be an
    int ≥ T and only "dr_grpo" uses it.  Pass it: the default, T, is this batch's padded length,
    which changes from batch to batch (then "dr_grpo" divides by a batch-dependent N·T, and is
    a constant normaliser only across batches padded to the same T).  The trainer passes
    ``max_new_tokens``.  An all-padding row counts as a zero term.

    ``normalizer``: when these N rows are one piece (a micro-batch, one rank's share) of a larger
    batch, the denominator of the whole batch (``aggregation_normalizer`` summed over its
    pieces), replacing N, Σ m or N·max_len above; the pieces' results then add up to the whole
    batch's.  A positive number; None: this batch's own.
    """
    _check_2d(per_token, "per_token")
    m = check_mask(mask, per_token.shape)
    _check_choice(loss_type, LOSS_TYPES, "loss_type")
    n, t = per_token.shape
    max_len = _max_len(max_len, t)
    if normalizer is None:
        normalizer = max(aggregation_normalizer(m, loss_type, max_len), 1)
    elif isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real) or not 0 < normalizer < math.inf:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    x = torch.where(m, per_token, 0.0)  # (N, T); never x·m, inf·0 = nan
    if loss_type == "grpo":
        lengths = m.sum(dim=1).clamp(min=1)  # (N,)
        return (x.sum(dim=1) / lengths).sum() / normalizer
    return x.sum() / normalizer


def importance_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, ratio_level: str = "token"
) -> torch.Tensor:
    """The importance ratio ρ between the current and the sampling (old) policy, [N, T].

        "token":    ρ_{i,t} = π_θ(o_{i,t}) / π_θold(o_{i,t}) = exp(log π_θ − log π_θold)
        "sequence": ρ_i = exp( Σ_t m·(log π_θ − log π_θold) / max(Σ_t m, 1) ), same for all t (GSPO)

    ``old_logprobs`` is a constant (detached).  ``mask`` is a bool [N, T]; padded positions must
    already hold finite values (``grpo_loss`` zeroes them).
    """
    log_ratio = logprobs - old_logprobs.detach()  # (N, T)
    if ratio_level == "token":
        return log_ratio.exp()
    mean_log_ratio = torch.where(mask, log_ratio, 0.0).sum(1) / mask.sum(1).clamp(min=1)  # (N,)
    return mean_log_ratio.exp()[:, None].expand_as(log_ratio)  # (N, T)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """The PPO clipped policy-gradient loss per token, [N, T]:

        pg_{i,t} = −min( ρ_{i,t} Â_i,  clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high) Â_i )

    ``advantages`` [N] are broadcast over t.  Once ρ has moved past 1 + ε_high with Â > 0 (or
    below 1 − ε_low with Â < 0) the clipped branch wins and the token's gradient is exactly 0.
    """
    adv = advantages[:, None]  # (N, 1)
    unclipped = ratio * adv  # (N, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv  # (N, T)
    return -torch.minimum(unclipped, clipped)


def cispo_surrogate(
    ratio: torch.Tensor, logprobs: torch.Tensor, advantages: torch.Tensor, eps_high: float
) -> torch.Tensor:
    """CISPO's policy-gradient loss per token (MiniMax-M1), [N, T]:

        pg_{i,t} = −sg( min(ρ_{i,t}, 1 + ε_high) ) · Â_i · log π_θ(o_{i,t} | q, o_{i,<t})

    sg is stop-gradient.  The importance weight is capped and treated as a constant, so every
    token keeps the gradient −ρ̂·Â·∇log π_θ, where PPO's clip (``clipped_surrogate``) gives a
    clipped token no gradient at all.  At ρ ≡ 1 its gradient is the clipped surrogate's; its
    value is not (−Â·log π_θ, not −Â).
    """
    weight = ratio.detach().clamp(max=1 + eps_high)  # (N, T), a constant
    return -weight * advantages[:, None] * logprobs


def _nan_to_zero(x: torch.Tensor) -> torch.Tensor:
    """NaN → 0, nothing else changed (a rollout log-prob the sampler could not give is NaN)."""
    return torch.where(torch.isnan(x), 0.0, x)


def rollout_weight(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, rollout_correction: str,
    rollout_ratio_min: float | None = None, rollout_ratio_max: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout (sampler) correction w, [N, T], and where the bounds changed it, [N, T] bool.

    The sampler π_rollout drew the tokens; the trainer's π_old recomputes their log-probs.  w is
    the ratio π_old/π_rollout (the book's ω), per token or per completion; a token whose rollout
    log-prob is NaN (the sampler gave none) adds 0 to the exponent::

        "token_*":     w_{i,t} = exp(m_{i,t}·(log π_old(o_{i,t}) − log π_rollout(o_{i,t})))
        "sequence_*":  w_i = exp(Σ_t m_{i,t}·(log π_old(o_{i,t}) − log π_rollout(o_{i,t}))),
                       the same for every t (a sum in the exponent, not GSPO's mean)
        "*_truncate":  w ← clamp(w, C_min, C_max)                       (truncated IS, TIS)
        "*_mask":      w ← 0 where w < C_min or w > C_max, else w       (masked IS, MIS)

    C_min = ``rollout_ratio_min``, C_max = ``rollout_ratio_max``; None is no bound.  A NaN token
    has w = 1 whenever C_min ≤ 1 ≤ C_max (the bounds still apply to it, as in TRL).  w is a
    constant (detached): ``grpo_loss`` multiplies the policy-gradient term by it, token by token.
    TRL 1.16's ``vllm_importance_sampling_*`` (``GRPOTrainer._generate_and_score_completions``).
    Inputs must be finite on padded positions (``grpo_loss`` zeroes them).
    """
    d = _nan_to_zero(torch.where(mask, old_logprobs.detach() - rollout_logprobs.detach(), 0.0))  # (N, T)
    if rollout_correction.startswith("sequence"):
        d = d.sum(1, keepdim=True).expand_as(d)  # (N, T), Σ_t d_{i,t} on every t
    w = d.exp()
    lo = -math.inf if rollout_ratio_min is None else rollout_ratio_min
    hi = math.inf if rollout_ratio_max is None else rollout_ratio_max
    outside = (w < lo) | (w > hi)  # (N, T) bool: the tokens the bounds change
    if rollout_correction.endswith("truncate"):
        return w.clamp(lo, hi), outside
    return torch.where(outside, 0.0, w), outside


def off_policy_mask(
    logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    off_policy_mask_threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (eq. 9), [N] bool, True = keep:

        keep_i = Â_i ≥ 0 or Σ_t m·(log π_rollout(o_{i,t}) − sg(log π_θ(o_{i,t}))) / max(Σ_t m, 1) ≤ δ_off

    The mean log-prob gap is a sample estimate of KL(π_rollout ‖ π_θ) on completion i: a completion
    with a negative advantage that the current policy has drifted far from (gap > δ_off) is dropped.
    A NaN rollout log-prob adds 0 to the sum and still counts in Σ_t m (as in TRL 1.16's
    ``GRPOTrainer.get_off_policy_mask``).  δ_off = ``off_policy_mask_threshold`` (TRL's name; 0.5 e.g.).
    """
    gap = _nan_to_zero(torch.where(mask, rollout_logprobs.detach() - logprobs.detach(), 0.0))  # (N, T)
    mean_gap = gap.sum(1) / mask.sum(1).clamp(min=1)  # (N,)
    return (advantages >= 0) | (mean_gap <= off_policy_mask_threshold)


# --------------------------------------------------------------------------- the whole loss


@dataclass
class LossOutput:
    """What ``grpo_loss`` returns."""

    loss: torch.Tensor
    """the scalar to backward, policy_loss + β·kl − α·entropy"""
    policy_loss: torch.Tensor
    """aggregated clipped surrogate L_PG (detached)"""
    kl: torch.Tensor | None
    """aggregated KL estimate (detached); None without ref_logprobs"""
    entropy: torch.Tensor | None
    """aggregated entropy H (detached); None without entropy"""
    metrics: dict[str, float] = field(default_factory=dict)
    """floats to log: clip fractions, ratio statistics, advantage statistics (``loss_metrics``),
    and ``kl_token_mean`` / ``entropy_token_mean``, the plain means over completion tokens (which
    differ from ``kl`` / ``entropy`` above, aggregated as the loss aggregates them)"""


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over the tokens where mask is True (0.0 when there are none)."""
    return (torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)).item()


LENGTH_METRICS = ("completion_tokens_mean", "completion_tokens_pos_adv", "completion_tokens_neg_adv")


def length_metrics(mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, float | None]:
    """The mean completion length ``|o_i| = Σ_t m_{i,t}`` over the N completions, and the same over
    those with Â > 0 and with Â < 0 (None if there are none): the lengths Dr. GRPO's
    length-bias argument is about."""
    lengths = mask.sum(1).double()  # (N,) the lengths ℓ_i
    adv = advantages.detach()
    return {
        "completion_tokens_mean": lengths.mean().item(),
        "completion_tokens_pos_adv": lengths[adv > 0].mean().item() if (adv > 0).any() else None,
        "completion_tokens_neg_adv": lengths[adv < 0].mean().item() if (adv < 0).any() else None,
    }


def loss_metrics(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float,
    surrogate: str = "clip",
) -> dict[str, float]:
    """Token statistics a practitioner watches, as in TRL (means over completion tokens).

    - clip_frac_low: fraction with ρ < 1 − ε_low and Â < 0 (clipped from below);
    - clip_frac_high: fraction with ρ > 1 + ε_high and Â > 0 (clipped from above); under CISPO,
      whose cap acts on the weight whatever Â's sign, every token with ρ > 1 + ε_high (and
      nothing is clipped below);
    - clip_frac: either; ratio_mean / ratio_min / ratio_max over the same tokens (1.0 if none);
    - advantages_abs_mean and zero_advantage_frac over the N completions; and ``length_metrics``.
    """
    ratio, adv = ratio.detach(), advantages.detach()[:, None]  # (N, T), (N, 1)
    if surrogate == "cispo":
        low, high = torch.zeros_like(mask), ratio > 1 + eps_high
    else:
        low, high = (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)
    valid = ratio[mask]
    return {
        "clip_frac_low": _masked_mean(low.to(ratio.dtype), mask),
        "clip_frac_high": _masked_mean(high.to(ratio.dtype), mask),
        "clip_frac": _masked_mean((low | high).to(ratio.dtype), mask),
        "ratio_mean": valid.mean().item() if valid.numel() else 1.0,  # 1.0: no tokens, no update
        "ratio_min": valid.min().item() if valid.numel() else 1.0,
        "ratio_max": valid.max().item() if valid.numel() else 1.0,
        "advantages_abs_mean": adv.abs().mean().item(),
        "zero_advantage_frac": (adv == 0).to(ratio.dtype).mean().item(),
        **length_metrics(mask, advantages),
    }


ROLLOUT_METRICS = ("sampling_logp_difference_mean", "sampling_logp_difference_max", "sampling_seq_log_ratio_std",
                   "importance_sampling_ratio_min", "importance_sampling_ratio_mean", "importance_sampling_ratio_max",
                   "importance_sampling_out_of_bounds_frac", "off_policy_masked_frac")


def rollout_metrics(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor | None, mask: torch.Tensor,
    w: torch.Tensor | None = None, outside: torch.Tensor | None = None, sequence_level: bool = False,
    keep: torch.Tensor | None = None,
) -> dict[str, float]:
    """How far the sampler is from the trainer, and what the corrections did (TRL 1.16's
    ``sampling/…`` metrics, flattened, plus three of ours).  With rollout log-probs:

    - sampling_logp_difference_mean / _max: ``|log π_rollout − log π_old|`` over completion tokens
      (tokens whose rollout log-prob is NaN left out; 0.0 if none);
    - sampling_seq_log_ratio_std: the std (population, over the completions that have tokens) of
      Σ_t m·(log π_old − log π_rollout), the log of the sequence-level weight before any bound;

    with a correction (``w`` [N, T] and ``outside`` from ``rollout_weight``):

    - importance_sampling_ratio_min / _mean / _max: w after its bounds, over completion tokens,
      or with ``sequence_level`` over the completions that have tokens, one w each (1.0 if none);
    - importance_sampling_out_of_bounds_frac: completion tokens whose w the bounds clamped
      (``"*_truncate"``) or zeroed (``"*_mask"``);

    and with the off-policy mask (``keep`` [N] from ``off_policy_mask``), whether or not there
    are rollout log-probs: off_policy_masked_frac, the fraction of the N completions it drops.
    """
    out = {}
    if rollout_logprobs is not None:
        diff = (rollout_logprobs - old_logprobs).detach()  # (N, T)
        gap = diff[mask & ~torch.isnan(diff)].abs()  # (tokens,)
        seq_log_ratio = -_nan_to_zero(torch.where(mask, diff, 0.0)).sum(1)[mask.any(1)]  # (N',)
        out["sampling_logp_difference_mean"] = gap.mean().item() if gap.numel() else 0.0
        out["sampling_logp_difference_max"] = gap.max().item() if gap.numel() else 0.0
        out["sampling_seq_log_ratio_std"] = seq_log_ratio.std(correction=0).item() if seq_log_ratio.numel() else 0.0
    if w is not None:
        first = mask & (mask.cumsum(1) == 1)  # (N, T): each non-empty completion's first token
        values = w[first] if sequence_level else w[mask]  # one w per completion, or per token
        out["importance_sampling_ratio_min"] = values.min().item() if values.numel() else 1.0
        out["importance_sampling_ratio_mean"] = values.mean().item() if values.numel() else 1.0
        out["importance_sampling_ratio_max"] = values.max().item() if values.numel() else 1.0
        out["importance_sampling_out_of_bounds_frac"] = _masked_mean(outside.to(w.dtype), mask)
    if keep is not None:
        out["off_policy_masked_frac"] = (~keep).double().mean().item()
    return out


def _check_grpo_inputs(logprobs, old_logprobs, advantages, ref_logprobs, entropy, beta, alpha,
                       eps_low, eps_high, loss_type, ratio_level, kl_estimator, surrogate,
                       kl_bias_correction) -> None:  # fmt: skip
    _check_2d(logprobs, "logprobs")
    _check_tensor(old_logprobs, "old_logprobs", logprobs.shape)
    _check_tensor(advantages, "advantages", logprobs.shape[:1])
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages must be finite")
    if ref_logprobs is not None:
        _check_tensor(ref_logprobs, "ref_logprobs", logprobs.shape)
    if entropy is not None:
        _check_tensor(entropy, "entropy", logprobs.shape)
    _check_coef(beta, "beta")
    _check_coef(alpha, "alpha")
    _check_coef(eps_low, "eps_low", upper=1.0)
    if eps_high is not None:
        _check_coef(eps_high, "eps_high")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's log-probs)")
    if alpha > 0 and entropy is None:
        raise ValueError("alpha > 0 needs entropy (per-token entropies of π_θ)")
    _check_choice(loss_type, LOSS_TYPES, "loss_type")
    _check_choice(ratio_level, RATIO_LEVELS, "ratio_level")
    _check_choice(kl_estimator, KL_ESTIMATORS, "kl_estimator")
    _check_choice(surrogate, SURROGATES, "surrogate")
    if not isinstance(kl_bias_correction, bool):
        raise ValueError(f"kl_bias_correction must be a bool, got {kl_bias_correction!r}")
    if surrogate == "cispo" and ratio_level != "token":
        raise ValueError("surrogate='cispo' weighs each token by its own ratio: it needs ratio_level='token'")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    beta: float = 0.0,
    alpha: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "grpo",
    ratio_level: str = "token",
    kl_estimator: str = "k3",
    max_len: int | None = None,
    surrogate: str = "clip",
    kl_bias_correction: bool = False,
    normalizer: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_ratio_min: float | None = None,
    rollout_ratio_max: float | None = 3.0,
    off_policy_mask_threshold: float | None = None,
) -> LossOutput:
    """The GRPO objective on one batch of completions.

        loss = agg(pg) + β · agg(kl) − α · agg(H)
        pg_{i,t} = −min(ρ Â_i, clip(ρ, 1 − ε_low, 1 + ε_high) Â_i)      (``clipped_surrogate``)
        kl_{i,t} = k3(log π_θ, log π_ref)                               (``kl_penalty``)

    With a rollout correction and/or the off-policy mask, the policy-gradient term becomes
    w_{i,t} · keep_i · pg_{i,t} before aggregation (w from ``rollout_weight``, keep from
    ``off_policy_mask``, both constants); the KL and entropy terms are never weighted.

    Args:
        logprobs: [N, T] log π_θ(o_{i,t} | q, o_{i,<t}), differentiable.
        old_logprobs: [N, T] log π_θold of the same tokens (the sampling policy), a constant.
        advantages: [N] Â_i (``group_advantages``), shared by every token of completion i.
        mask: [N, T] 1 on completion tokens, 0 on padding (bool, int or float 0/1).
        ref_logprobs: [N, T] log π_ref (frozen reference), needed when beta > 0.
        entropy: [N, T] H(π_θ(· | q, o_{i,<t})), differentiable, needed when alpha > 0.
        beta: β ≥ 0, KL weight (DeepSeekMath 0.04; 0 in DAPO/Dr. GRPO).
        alpha: α ≥ 0, entropy bonus weight (0 in DeepSeekMath, DAPO and TRL's default).
        eps_low: ε_low in [0, 1), lower clip range (PPO/GRPO 0.2).
        eps_high: ε_high ≥ 0, upper clip range (DAPO "clip-higher" 0.28); None means eps_low,
            or under CISPO ``CISPO_EPS_HIGH`` = 4 (a cap of 5 on the weight, ScaleRL's ε_max).
        loss_type: "grpo", "dapo" or "dr_grpo" (see ``aggregate``).
        ratio_level: "token" (GRPO) or "sequence" (GSPO) (see ``importance_ratio``).
        kl_estimator: "k1", "k2" or "k3" (see ``kl_penalty``).
        max_len: L_max, the generation budget "dr_grpo" divides by; default T, this batch's
            padded length, which varies from batch to batch (see ``aggregate``).
        surrogate: "clip" (PPO/GRPO, ``clipped_surrogate``) or "cispo" (MiniMax-M1,
            ``cispo_surrogate``: the weight capped at 1 + eps_high, no lower clip; token ratios).
        kl_bias_correction: multiply each token's KL estimate by its ratio ρ_{i,t} (with its
            gradient), kl_{i,t} = ρ_{i,t} · k(…): the importance-weighted KL of DeepSeek-V3.2 and
            TRL's ``use_bias_correction_kl``, whose expectation over samples of π_θold is the
            KL of π_θ.  With token ratios, per token its gradient is that of KL(π_θ‖π_ref) at
            that position (chapter 4); with ``ratio_level="sequence"`` the weight is the
            sequence's length-normalised ρ_i, not the token's, so that does not hold (TRL
            documents the same caveat).
        normalizer: when these N rows are a piece (micro-batch, rank) of a larger optimiser
            batch, the whole batch's denominator, ``aggregation_normalizer`` summed over its
            pieces; every term is then divided by it (see ``aggregate``), so the pieces' losses
            add up to the whole batch's loss, and their gradients to its gradient.
        rollout_logprobs: [N, T] log π_rollout, the sampler's own log-probs of the tokens (an
            inference engine's, or stale weights'); NaN where it gave none, never ±inf on a
            completion token.  Given, the metrics report the mismatch (``rollout_metrics``).
        rollout_correction: None, "token_truncate", "token_mask", "sequence_truncate" or
            "sequence_mask": weigh pg by w = π_old/π_rollout per token or per sequence, clamped
            to or masked outside [C_min, C_max] (``rollout_weight``; TRL's
            ``vllm_importance_sampling_mode``).  Needs ``rollout_logprobs``.
        rollout_ratio_min: C_min > 0 or None (no lower bound; TRL's default).
        rollout_ratio_max: C_max > 0 or None (no upper bound); TRL's default 3.0.
        off_policy_mask_threshold: δ_off of DeepSeek-V3.2's off-policy sequence mask
            (``off_policy_mask``), e.g. 0.5: a completion with Â < 0 whose mean log-prob gap
            log π_rollout − log π_θ exceeds δ_off gets no policy gradient; ``old_logprobs`` stand in
            for ``rollout_logprobs`` when those are None (as in TRL).  None: off.
    Returns:
        ``LossOutput``; the KL (entropy) term is reported whenever ref_logprobs (entropy) is
        given and enters the loss only when beta (alpha) > 0.
    """
    _check_grpo_inputs(logprobs, old_logprobs, advantages, ref_logprobs, entropy, beta, alpha,
                       eps_low, eps_high, loss_type, ratio_level, kl_estimator, surrogate,
                       kl_bias_correction)  # fmt: skip
    m = check_mask(mask, logprobs.shape)  # (N, T) bool
    check_rollout_options(rollout_correction, rollout_ratio_min, rollout_ratio_max, off_policy_mask_threshold)
    if rollout_logprobs is not None:
        _check_tensor(rollout_logprobs, "rollout_logprobs", logprobs.shape)
        if torch.isinf(rollout_logprobs[m]).any():
            raise ValueError("rollout_logprobs must not be ±inf on a completion token (NaN: the sampler gave none)")
    elif rollout_correction is not None:
        raise ValueError(f"rollout_correction={rollout_correction!r} needs rollout_logprobs (the sampler's log-probs)")
    if eps_high is None:
        eps_high = CISPO_EPS_HIGH if surrogate == "cispo" else eps_low

    def clean(x):  # padded positions → 0 before anything else
        return None if x is None else torch.where(m, _upcast(x), 0.0)

    logprobs, old_logprobs, ref_logprobs, entropy, rollout_logprobs = map(
        clean, (logprobs, old_logprobs, ref_logprobs, entropy, rollout_logprobs))
    advantages = _upcast(advantages).detach().to(logprobs.dtype)

    def agg(x):
        return aggregate(x, m, loss_type, max_len, normalizer=normalizer)

    ratio = importance_ratio(logprobs, old_logprobs, m, ratio_level)  # (N, T)
    if surrogate == "clip":
        pg = clipped_surrogate(ratio, advantages, eps_low, eps_high)  # (N, T)
        metrics = loss_metrics(ratio, advantages, m, eps_low, eps_high)
    else:  # no lower clip
        pg = cispo_surrogate(ratio, logprobs, advantages, eps_high)  # (N, T)
        metrics = loss_metrics(ratio, advantages, m, eps_low, eps_high, surrogate)
    w = outside = keep = None
    if rollout_correction is not None:
        w, outside = rollout_weight(old_logprobs, rollout_logprobs, m, rollout_correction,
                                    rollout_ratio_min, rollout_ratio_max)  # (N, T), constants
        pg = w * pg
    if off_policy_mask_threshold is not None:
        sampled = old_logprobs if rollout_logprobs is None else rollout_logprobs
        keep = off_policy_mask(logprobs, sampled, advantages, m, off_policy_mask_threshold)  # (N,)
        pg = torch.where(keep[:, None], pg, 0.0)
    sequence_level = rollout_correction is not None and rollout_correction.startswith("sequence")
    metrics.update(rollout_metrics(old_logprobs, rollout_logprobs, m, w, outside, sequence_level, keep))
    policy_loss = agg(pg)
    loss = policy_loss
    kl = None
    if ref_logprobs is not None:
        per_token_kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)  # (N, T)
        if kl_bias_correction:
            per_token_kl = ratio * per_token_kl
        kl = agg(per_token_kl)
        metrics["kl_token_mean"] = _masked_mean(per_token_kl.detach(), m)
        if beta > 0:
            loss = loss + beta * kl
    if entropy is not None:
        entropy_term = agg(entropy)
        metrics["entropy_token_mean"] = _masked_mean(entropy.detach(), m)
        if alpha > 0:
            loss = loss - alpha * entropy_term
        entropy = entropy_term.detach()
    return LossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl=None if kl is None else kl.detach(),
        entropy=entropy,
        metrics=metrics,
    )
