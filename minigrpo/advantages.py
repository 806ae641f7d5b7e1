"""Group-relative advantages: how much better each completion did than its siblings.

GRPO has no value network.  It samples G completions o_1..o_G for the same prompt q, scores them
with rewards r_1..r_G, and uses the group itself as the baseline:

    Â_i = (r_i − mean_j r_j) / (std_j r_j + δ)

δ (the keyword ``eps``) is a small constant added to the std, not a floor max(std, δ).  A group
whose rewards are all equal gets advantages of exactly 0 without a division, so δ is not what
keeps the division finite here.  With 0/1 rewards a live group's std is at least 1/√G and δ
barely changes the advantages; for a group whose rewards differ by about δ or less, δ dominates
the denominator and pulls the advantages towards 0.  The baseline
mean_j r_j includes r_i itself; ``baseline="leave_one_out"`` uses the mean of the other G − 1
instead (RLOO), which is the same advantage times G/(G − 1).  Every token of
completion i shares the advantage Â_i.  Rewards arrive as one flat vector of
N = prompts × G values in which consecutive blocks of G form one group (TRL's layout).
"""

from __future__ import annotations

import math
import numbers

import torch

SCALES = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")


def _validate(rewards: torch.Tensor, group_size: int, scale: str, eps: float, baseline: str) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor [N]")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be floating point, got {rewards.dtype}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite (found nan or inf)")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of rewards N={rewards.numel()}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("baseline='leave_one_out' needs group_size >= 2 (the others of the group)")


def _std(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Bessel-corrected std along ``dim`` (kept as a size-1 dim), or of all elements (a scalar)
    for ``dim=None``.  Where the plain
    formula underflows to 0 or overflows to inf (spreads below ~1e-154 or above ~1e154 in
    float64), it is recomputed on x scaled by its largest |deviation|, which leaves the value
    unchanged and finite."""
    plain = x.std() if dim is None else x.std(dim=dim, keepdim=True)
    if bool(((plain > 0) & torch.isfinite(plain)).all()):
        return plain
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    centred = x - x.mean(dim=dims, keepdim=True)
    peak = centred.abs().amax(dim=dims, keepdim=True)
    rescaled = peak * (centred / torch.where(peak > 0, peak, 1.0)).std(dim=dims, keepdim=True)
    return torch.where((plain > 0) & torch.isfinite(plain), plain, rescaled.reshape(plain.shape))


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, *, baseline: str = "mean"
) -> torch.Tensor:
    """Group-relative advantages Â_i = (r_i − b_i) / (std_j r_j + δ).

    The baseline b_i comes from i's own group (j runs over the G = ``group_size`` completions
    of the same prompt).  ``baseline`` picks it:

    - ``"mean"`` (GRPO): b_i = mean_j r_j, which includes r_i itself;
    - ``"leave_one_out"`` (RLOO): b_i = mean_{j≠i} r_j, the mean of the *other* G − 1, so that
      b_i does not depend on o_i.  Then r_i − b_i = G/(G − 1) · (r_i − mean_j r_j): the same
      direction as GRPO's, larger by G/(G − 1) (GRPO's numerator is (G − 1)/G of RLOO's).

    ``scale`` picks the denominator:

    - ``"group"`` (DeepSeekMath GRPO): std_j over the group, Bessel-corrected (÷ (G − 1)).
    - ``"batch"``: the Bessel-corrected std over all N rewards (TRL's ``scale_rewards="batch"``).
    - ``"none"`` (Dr. GRPO): no division, Â_i = r_i − mean_j r_j; avoids up-weighting questions
      that are almost always (or almost never) solved.

    A group whose rewards are all equal carries no signal: its advantages are exactly 0 in every
    mode (so is everything when ``group_size`` is 1).

    Args:
        rewards: [N] finite floats, consecutive blocks of ``group_size`` forming one group.
        group_size: G, a positive int dividing N.
        scale: "group", "batch" or "none".
        eps: δ ≥ 0, added to the std (typical 1e-4, as TRL); ignored for "none".
        baseline: "mean" or "leave_one_out" (G ≥ 2).
    Returns:
        [N] advantages, same dtype as ``rewards``.
    """
    _validate(rewards, group_size, scale, eps, baseline)
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (prompts, G)
    if baseline == "leave_one_out":  # r_i − mean_{j≠i} r_j, written without the sum of the others
        centred = centred * (group_size / (group_size - 1))
    flat = grouped[:, :1] == grouped  # (prompts, G)
    flat_group = flat.all(dim=1, keepdim=True)  # (prompts, 1): all rewards equal
    if scale == "group":
        std = _std(grouped, dim=1) if group_size > 1 else torch.ones_like(centred[:, :1])
        advantages = centred / torch.where(flat_group, 1.0, std + eps)
    elif scale == "batch":
        std = _std(rewards) if rewards.numel() > 1 else torch.ones((), dtype=rewards.dtype)
        advantages = centred / (torch.where(flat_group.all(), 1.0, std) + eps)
    else:
        advantages = centred
    return torch.where(flat_group, 0.0, advantages).view(-1)  # (N,)


# --------------------------------------------------------------------------- rewards and groups


def compute_rewards(
    completions: list[str], answers: list[str], reward_funcs, reward_weights
) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward parts r_k(o_i, answer_i), shape (K, N), one row per reward function, and
    each function's batch mean as ``reward_<name>``; the reward is r_i = Σ_k w_k·r_k (``combine``)."""
    parts = torch.tensor([[float(func(c, a)) for c, a in zip(completions, answers)] for func in reward_funcs])
    parts = parts.view(len(reward_funcs), len(completions))  # (K, N), also when N = 0
    return parts, {f"reward_{func.__name__}": row.mean().item() for func, row in zip(reward_funcs, parts)}


def combine(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """r_i = Σ_k w_k·r_{k,i}: (K, N) parts and (K,) weights to the (N,) rewards."""
    return weights @ parts


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment for completions of ``lengths`` tokens, (N,); with ℓ a
    completion's length::

        R_length(ℓ) = 0                                if ℓ ≤ L_max − L_cache
                      ((L_max − L_cache) − ℓ) / L_cache  if L_max − L_cache < ℓ ≤ L_max

    so a completion that reaches the limit L_max (``max_len``) loses 1.  ``cache`` = L_cache > 0.
    """
    return ((max_len - cache) - lengths.float()).clamp(max=0) / cache


def live_groups(rewards: torch.Tensor, group_size: int) -> list[int]:
    """The groups whose rewards are not all equal (the ones with a learning signal)."""
    groups = rewards.view(-1, group_size)  # (P, G)
    return (groups.max(dim=1).values != groups.min(dim=1).values).nonzero().flatten().tolist()


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (advantage 0: no learning signal)."""
    groups = rewards.view(-1, group_size)  # (P, G)
    return (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()
