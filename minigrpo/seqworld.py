"""An enumerable sequence world: every completion of a toy language model, with exact gradients.

Chapters 3 and 4 prove their identities on one-token toys, where a completion is one token.  A
language model's completion is a sequence, and some identities change on the way.  This module
builds the smallest world in which the difference shows and every expectation is a finite sum:

- V tokens, one of which is EOS (``eos``), and a horizon H.  A completion o = (o_1, …, o_L)
  stops at its first EOS or after H tokens (its length L ≤ H), so there are M = Σ_{L<H} (V−1)^(L−1) + V·(V−1)^(H−1)
  of them (15 for V = 3, H = 3);
- a *tabular* policy: one row of V logits per prefix o_<t (every string of non-EOS tokens shorter
  than H, P = Σ_{l<H} (V−1)^l rows), π_θ(v | o_<t) = softmax(θ[o_<t])_v.

Why tabular and not a small parametric model: with one free row per prefix the policy can put any
distribution (of full support) on the completions, so the optimum of the KL-regularised objective,
``π*(o) ∝ π_ref(o)·exp(r(o)/β)``, is a policy of the family (``policy_logits`` finds its logits)
and "the gradient" means the same thing for every estimator; the score of token t moves only the
row of its own prefix, exactly as a language model's next-token distribution is a function of the
prefix.  A parametric model would share weights between prefixes and could not represent ``π*``.

Completions are tensors in the book's layout: ``tokens`` [M, H] (padded with EOS), ``mask``
[M, H] (1 on completion tokens), so every function of the package applies to them.  A gradient is
a tensor shaped like the logits, [P, V]; per-sample gradients are [M, P, V].  All functions work in
the dtype of the logits (pass float64 for exact checks).

What the module computes, each by enumeration (a sum over the M completions, no sampling):

- log-probabilities per token and per completion, J(θ) = Σ_o π_θ(o) r(o), the sequence KL;
- per-sample gradients g(o) = Σ_t c_t(o) ∇_θ log π_θ(o_t | o_<t) of any estimator that weighs
  token t's score by c_t (``score_gradients``), their exact mean and variance under a sampling
  policy (``gradient_moments``), and the weights c_t of the KL estimators and of the policy
  gradient with per-token and sequence importance ratios (``kl_coefficients``,
  ``policy_gradient_coefficients``);
- GRPO's expected gradient for groups of G, exact (``grpo_expected_gradient``);
- the optimum of the KL-regularised objective (``kl_regularised_optimum``).

The module imports torch and the ground floor (``logprobs``, ``advantages``, ``losses``, which
import only torch), so that its estimators are the package's own functions, not copies.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from minigrpo.advantages import SCALES, group_advantages
from minigrpo.logprobs import token_logprobs as _token_logprobs
from minigrpo.losses import LOSS_TYPES, kl_penalty

KL_ESTIMATORS = (
    "k1 in the reward", "k1 in the reward, to go", "k1 in the reward, pi_old", "k1 loss", "k2 loss", "k3 loss",
    "rho*k3 loss",
)
"""The ways ``kl_coefficients`` puts the KL into an update, in its order."""

PG_ESTIMATORS = ("no ratio", "token ratio", "sequence ratio")
"""The importance weights ``policy_gradient_coefficients`` compares, in its order."""


@dataclass(frozen=True)
class SequenceWorld:
    """Every completion of a V-token, horizon-H world, in the book's [M, H] layout."""

    vocab_size: int
    """V: tokens, EOS included"""
    horizon: int
    """H: the most tokens a completion may have (L_max)"""
    eos: int
    """the id of the end-of-sequence token"""
    tokens: torch.Tensor
    """[M, H] long: the completions' tokens, padded with ``eos``"""
    mask: torch.Tensor
    """[M, H] float64: 1 on completion tokens, 0 on padding"""
    prefix: torch.Tensor
    """[M, H] long: the row of the logit table that gives token t, the id of the prefix o_<t (0 on padding)"""
    prefixes: tuple[tuple[int, ...], ...]
    """the P prefixes, in row order: ``prefixes[p]`` are the tokens of row p (row 0 is the empty prefix)"""

    @property
    def num_completions(self) -> int:
        """M, the number of completions."""
        return self.tokens.shape[0]

    @property
    def num_prefixes(self) -> int:
        """P, the number of rows of the logit table."""
        return len(self.prefixes)

    @property
    def lengths(self) -> torch.Tensor:
        """The completions' lengths, Σ_t m_t, [M] float64."""
        return self.mask.sum(1)


def sequence_world(vocab_size: int = 3, horizon: int = 3, eos: int = 0) -> SequenceWorld:
    """Enumerate every completion of a world of ``vocab_size`` tokens and horizon ``horizon``.

    A completion stops at its first EOS (the EOS is part of it) or after H tokens, whichever comes
    first; completions are listed by length, then in lexicographic order.  Prefixes are the strings
    of non-EOS tokens shorter than H, by length then lexicographically.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab_size:
        raise ValueError(f"eos must be a token id in [0, {vocab_size}), got {eos!r}")
    words = [v for v in range(vocab_size) if v != eos]
    prefixes = [p for n in range(horizon) for p in itertools.product(words, repeat=n)]
    row = {p: i for i, p in enumerate(prefixes)}
    completions = [p + (eos,) for p in prefixes if len(p) < horizon - 1]  # stopped by EOS
    completions += [p + (v,) for p in prefixes if len(p) == horizon - 1 for v in range(vocab_size)]
    completions.sort(key=lambda o: (len(o), o))
    m = len(completions)
    tokens = torch.full((m, horizon), eos, dtype=torch.long)
    mask = torch.zeros(m, horizon, dtype=torch.float64)
    prefix = torch.zeros(m, horizon, dtype=torch.long)
    for i, o in enumerate(completions):
        tokens[i, : len(o)] = torch.tensor(o)
        mask[i, : len(o)] = 1.0
        prefix[i, : len(o)] = torch.tensor([row[o[:t]] for t in range(len(o))])
    return SequenceWorld(vocab_size, horizon, eos, tokens, mask, prefix, tuple(prefixes))


def random_logits(world: SequenceWorld, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A logit table [P, V] of independent N(0, scale²) entries, float64, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(world.num_prefixes, world.vocab_size, generator=g, dtype=torch.float64)


def _check_logits(world: SequenceWorld, logits: torch.Tensor, name: str = "logits") -> None:
    shape = (world.num_prefixes, world.vocab_size)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or tuple(logits.shape) != shape:
        raise ValueError(f"{name} must be a floating-point tensor of shape [P, V] = {list(shape)}")


def _check_per_completion(world: SequenceWorld, x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape) != (world.num_completions,):
        raise ValueError(f"{name} must be a floating-point tensor of shape [M] = [{world.num_completions}]")


def token_logprobs(world: SequenceWorld, logits: torch.Tensor) -> torch.Tensor:
    """log π_θ(o_t | o_<t) of every completion's tokens, [M, H], 0 on padding.

    The row of ``logits`` [P, V] of each token's prefix, through the package's
    ``minigrpo.logprobs.token_logprobs`` (differentiable).
    """
    _check_logits(world, logits)
    rows = logits[world.prefix]  # (M, H, V)
    return _token_logprobs(rows, world.tokens) * world.mask.to(logits.dtype)  # (M, H)


def sequence_logprobs(world: SequenceWorld, logits: torch.Tensor) -> torch.Tensor:
    """log π_θ(o) of every completion, [M].

    A completion's probability is the product of its tokens' (the chain rule), so::

        log π_θ(o) = Σ_t m_t · log π_θ(o_t | o_<t)

    This identity is what connects the policy-gradient theorem, stated for whole completions
    (∇J = E[r(o) ∇ log π_θ(o)]), to a loss written per token: the score of a completion is the sum
    of its tokens' scores, ∇ log π_θ(o) = Σ_t m_t ∇ log π_θ(o_t | o_<t).
    """
    return token_logprobs(world, logits).sum(1)


def probabilities(world: SequenceWorld, logits: torch.Tensor) -> torch.Tensor:
    """π_θ(o) = exp(log π_θ(o)) of every completion, [M]; they sum to 1."""
    return sequence_logprobs(world, logits).exp()


def expected_reward(world: SequenceWorld, logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """J(θ) = Σ_o π_θ(o) r(o), exactly (a differentiable scalar); ``rewards`` is r(o), [M]."""
    _check_per_completion(world, rewards, "rewards")
    return probabilities(world, logits) @ rewards.to(logits.dtype)


def sequence_kl(world: SequenceWorld, logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_θ ‖ π') between the completion distributions of two tables, exactly::

        KL(π_θ ‖ π') = Σ_o π_θ(o) · (log π_θ(o) − log π'(o))

    (a differentiable scalar in both tables).  With π' = π_ref this is the *reverse* KL of the
    KL-regularised objective (the expectation under the policy being trained); the *forward* KL
    is ``sequence_kl(world, ref_logits, logits)``, the expectation under the reference.
    """
    _check_logits(world, other_logits, "other_logits")
    logp, other = sequence_logprobs(world, logits), sequence_logprobs(world, other_logits)
    return logp.exp() @ (logp - other)


def gradient(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """∇ of a scalar with respect to a logit table that requires grad, [P, V] (autograd)."""
    (grad,) = torch.autograd.grad(value, logits)
    return grad


def score_gradients(world: SequenceWorld, logits: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Per-completion gradients g(o), [M, P, V], of an estimator that weighs token t's score by c_t::

        g(o) = Σ_t m_t · c_t(o) · ∇_θ log π_θ(o_t | o_<t)

    with the closed form of a softmax's score: ∇ log π_θ(o_t | o_<t) is e_{o_t} − π_θ(· | o_<t) in
    the row of the prefix o_<t and 0 elsewhere (e_v the one-hot vector of token v).
    ``coefficients`` [M, H] are constants (c of ``kl_coefficients`` or
    ``policy_gradient_coefficients``); c_t = r(o) for every t gives REINFORCE's r(o)·∇ log π_θ(o).
    """
    _check_logits(world, logits)
    m, h = world.tokens.shape
    if not isinstance(coefficients, torch.Tensor) or tuple(coefficients.shape) != (m, h):
        raise ValueError(f"coefficients must be a tensor of shape [M, H] = [{m}, {h}]")
    probs = logits.detach().softmax(-1)  # (P, V)
    onehot = torch.nn.functional.one_hot(world.tokens, world.vocab_size).to(probs.dtype)  # (M, H, V)
    score = onehot - probs[world.prefix]  # (M, H, V)
    weighted = (coefficients.detach().to(probs.dtype) * world.mask.to(probs.dtype))[..., None] * score
    out = torch.zeros(m, world.num_prefixes, world.vocab_size, dtype=probs.dtype)
    rows = torch.arange(m)[:, None].expand(m, h)
    out.index_put_((rows, world.prefix), weighted, accumulate=True)  # (M, P, V)
    return out


@dataclass(frozen=True)
class GradientMoments:
    """The exact mean and spread of a one-completion gradient estimate under a sampling policy."""

    mean: torch.Tensor
    """E_q[g(o)], [P, V]"""
    variance: float
    """E_q ‖g(o) − E_q[g]‖², the trace of g's covariance (one completion's estimate)"""


def gradient_moments(per_sample: torch.Tensor, weights: torch.Tensor) -> GradientMoments:
    """Mean Σ_o q(o) g(o) and variance Σ_o q(o) ‖g(o) − mean‖² of per-completion gradients
    ``per_sample`` [M, P, V] under sampling probabilities ``weights`` = q(o), [M]."""
    if per_sample.dim() != 3 or weights.shape != per_sample.shape[:1]:
        raise ValueError("per_sample must be [M, P, V] and weights [M]")
    q = weights.detach().to(per_sample.dtype)
    mean = torch.einsum("m,mpv->pv", q, per_sample)  # (P, V)
    variance = q @ (per_sample - mean).square().sum((1, 2))
    return GradientMoments(mean, float(variance))


def _sampler(world, logits, sampler_logits):
    """log π_old per token [M, H] (π_θ's, detached, when ``sampler_logits`` is None)."""
    if sampler_logits is None:
        return token_logprobs(world, logits).detach()
    return token_logprobs(world, sampler_logits).detach()


def _coefficients(lp: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """c_{m,t} = ∂ surrogate_m / ∂ ℓ_{m,t}, [M, H] (each completion's surrogate depends on its row)."""
    (c,) = torch.autograd.grad(surrogate.sum(), lp)
    return c


def kl_coefficients(
    world: SequenceWorld, logits: torch.Tensor, ref_logits: torch.Tensor, sampler_logits: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The weight c_t [M, H] that each way of putting KL(π_θ ‖ π_ref) into the update gives token
    t's score, for completions sampled from π_old (``sampler_logits``; None: from π_θ itself).

    Each estimator is a per-completion surrogate s(o) whose gradient is its one-sample estimate of
    ∇ KL; c_t = ∂s/∂ℓ_t by autograd through the package's ``kl_penalty``, with ℓ_t = log π_θ(o_t |
    o_<t), k1_t = ℓ_t − log π_ref(o_t | o_<t) (its value), ρ_t = exp(ℓ_t − log π_old(o_t | o_<t))
    and w = Π_t ρ_t (a constant; 1 on-policy)::

        "k1 in the reward"          s = w · sg(Σ_s k1_s) · Σ_t ℓ_t      c_t = w · Σ_s k1_s
        "k1 in the reward, to go"   s = w · Σ_t sg(Σ_{s≥t} k1_s) · ℓ_t  c_t = w · Σ_{s≥t} k1_s
        "k1 in the reward, pi_old"  s = w · Σ_s k1old_s · Σ_t ℓ_t        c_t = w · Σ_s k1old_s
        "k1 loss"                   s = Σ_t k1_t                         c_t = 1
        "k2 loss"                   s = Σ_t k2_t                         c_t = k1_t
        "k3 loss"                   s = Σ_t k3_t                         c_t = 1 − π_ref/π_θ (token t)
        "rho*k3 loss"               s = Σ_t ρ_t · k3_t                   c_t = ρ_t · k1_t

    The first two put the sequence's log-ratio log π_θ(o)/π_ref(o) = Σ_s k1_s into the reward (as
    RLHF does; sg = stop-gradient), weighted by the sequence ratio w so that they stay exact
    off-policy: token t's score is multiplied by every token's penalty, or by its own and the later
    ones' (earlier penalties average to zero against it).  Both recompute the penalty with the
    current π_θ.  The third is the penalty as RLHF implementations store it (TRL's PPOTrainer did,
    in the versions that shipped it; TRL 1.16 has none): computed once from the rollout's
    log-probabilities, k1old_s = log π_old(o_s | o_<s) − log π_ref(o_s | o_<s), and held fixed
    while θ moves.  Its expectation under π_old is
    Σ_o π_θ(o)·log(π_old(o)/π_ref(o))·∇ log π_θ(o) = ∇KL(π_θ ‖ π_ref) − ∇KL(π_θ ‖ π_old): the first
    row's on-policy, biased off it.  The last four are per-token losses as GRPO writes them, each
    token's term differentiated on its own; their sum over t is taken (GRPO's ``"grpo"``
    aggregation, a mean over each completion's tokens, would reweight completions on top).
    """
    _check_logits(world, ref_logits, "ref_logits")
    m = world.mask.to(logits.dtype)
    lp = token_logprobs(world, logits).detach().requires_grad_(True)  # (M, H), ℓ as a leaf
    ref = token_logprobs(world, ref_logits).detach()  # (M, H)
    old = _sampler(world, logits, sampler_logits)  # (M, H)
    rho = torch.exp(lp - old)  # (M, H), ρ_t with its gradient
    w = torch.exp(((lp - old) * m).sum(1)).detach()  # (M,), the sequence weight
    k1 = ((lp - ref) * m).detach()  # (M, H), values
    to_go = k1.flip(1).cumsum(1).flip(1)  # (M, H): Σ_{s≥t} k1_s
    surrogates = {
        "k1 in the reward": w * k1.sum(1) * (lp * m).sum(1),
        "k1 in the reward, to go": w * (to_go * lp * m).sum(1),
        "k1 in the reward, pi_old": w * ((old - ref) * m).sum(1) * (lp * m).sum(1),
        "k1 loss": (kl_penalty(lp, ref, "k1") * m).sum(1),
        "k2 loss": (kl_penalty(lp, ref, "k2") * m).sum(1),
        "k3 loss": (kl_penalty(lp, ref, "k3") * m).sum(1),
        "rho*k3 loss": (rho * kl_penalty(lp, ref, "k3") * m).sum(1),
    }
    return {name: _coefficients(lp, s) for name, s in surrogates.items()}


def policy_gradient_coefficients(
    world: SequenceWorld, logits: torch.Tensor, advantages: torch.Tensor, sampler_logits: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The weight c_t [M, H] of token t's score in the policy gradient from completions of π_old
    (``sampler_logits``; None: π_θ), for an advantage Â(o) per completion (``advantages`` [M]).

    The surrogates (maximised; ρ_t = π_θ(o_t | o_<t) / π_old(o_t | o_<t), w = Π_t ρ_t)::

        "no ratio"         s = Â · Σ_t ℓ_t       c_t = Â            (the samples treated as π_θ's)
        "token ratio"      s = Â · Σ_t ρ_t       c_t = ρ_t · Â      (GRPO/PPO, unclipped)
        "sequence ratio"   s = Â · w             c_t = w · Â        (exact importance sampling)

    Only the sequence ratio w = π_θ(o)/π_old(o) makes E_old[g] = E_θ[Â ∇ log π_θ(o)], the identity
    importance sampling is derived for; the per-token ratio reweights token t alone, as if the
    prefix o_<t had been drawn from π_θ.  All three agree on-policy (ρ ≡ 1).
    """
    _check_per_completion(world, advantages, "advantages")
    m = world.mask.to(logits.dtype)
    lp = token_logprobs(world, logits).detach().requires_grad_(True)  # (M, H)
    old = _sampler(world, logits, sampler_logits)
    adv = advantages.detach().to(logits.dtype)  # (M,)
    surrogates = {
        "no ratio": adv * (lp * m).sum(1),
        "token ratio": adv * (torch.exp(lp - old) * m).sum(1),
        "sequence ratio": adv * torch.exp(((lp - old) * m).sum(1)),
    }
    return {name: _coefficients(lp, s) for name, s in surrogates.items()}


def estimator_moments(
    world: SequenceWorld, logits: torch.Tensor, coefficients: dict[str, torch.Tensor],
    sampler_logits: torch.Tensor | None = None,
) -> dict[str, GradientMoments]:
    """``gradient_moments`` of each estimator in ``coefficients`` (name → c [M, H]), under the
    sampling policy π_old (``sampler_logits``; None: π_θ): its exact expected gradient and variance."""
    q = probabilities(world, logits if sampler_logits is None else sampler_logits).detach()
    return {name: gradient_moments(score_gradients(world, logits, c), q) for name, c in coefficients.items()}


def relative_bias(mean: torch.Tensor, target: torch.Tensor) -> float:
    """‖mean − target‖ / ‖target‖: 0 for an unbiased estimator, 1 for one whose mean is 0."""
    return float((mean - target).norm() / target.norm())


# --------------------------------------------------------------------------- GRPO's expected gradient


def _multisets(num_classes: int, size: int, class_probs: torch.Tensor):
    """Every multiset of ``size`` classes as counts [S, K], and its multinomial probability [S]."""
    combos = torch.tensor(list(itertools.combinations_with_replacement(range(num_classes), size)))  # (S, size)
    counts = torch.nn.functional.one_hot(combos, num_classes).sum(1).to(torch.float64)  # (S, K)
    log_coef = math.lgamma(size + 1) - torch.lgamma(counts + 1).sum(1)
    logp = torch.where(counts > 0, counts * class_probs.clamp_min(1e-300).log(), 0.0).sum(1)
    return counts, (log_coef + logp).exp()


def grpo_expected_gradient(
    world: SequenceWorld, logits: torch.Tensor, rewards: torch.Tensor, group_size: int, *,
    loss_type: str = "grpo", scale: str = "group", baseline: str = "mean", eps: float = 1e-4,
    max_len: int | None = None,
) -> torch.Tensor:
    """E[−∇_θ L_PG] for one group of G = ``group_size`` completions sampled from π_θ, exactly, [P, V].

    At the first update (ρ ≡ 1, nothing clipped) GRPO's policy loss for one group has the gradient::

        −∇ L_PG = Σ_i a_i · Â_i · Σ_t m_{i,t} ∇ log π_θ(o_{i,t} | o_{i,<t})

    with Â_i from ``group_advantages(rewards, G, scale, eps, baseline=baseline)`` and the weight
    a_i of ``aggregate``'s ``loss_type`` (``n_i`` the length of o_i)::

        "grpo"      a_i = 1 / (G · n_i)
        "dapo"      a_i = 1 / Σ_j n_j
        "dr_grpo"   a_i = 1 / (G · L_max)        L_max = max_len, default H

    Its expectation over groups, compared with ∇J: with "dr_grpo" and ``scale="none"`` it is
    (G−1)/(G·L_max)·∇J for the group mean and ∇J/L_max for ``baseline="leave_one_out"``.  The
    length in "grpo" and "dapo" and the group's std (``scale="group"``) make the weight of a
    completion depend on its length and on the rest of its group, and the expectation is in
    general no longer a multiple of ∇J.  (With one prompt, two reward values and a weight a_i that
    depends on o_i alone, "grpo" or "dr_grpo", the std only rescales the ``scale="none"``
    expectation: the other members are independent of o_i, so E[Â_i | o_i] is a function of r_i
    alone, affine on two values and of mean zero, hence a multiple of r_i − E[r].  Under "dapo"
    a_i depends on the other members' lengths, which go with their rewards, and the std can turn
    it, slightly on the book's world.)

    Exact, not sampled: a_i·Â_i depends on the group only through each member's (reward, length)
    class, so the expectation is a finite sum over the class of o_i and the multiset of the other
    G − 1 members' classes (multinomial probabilities), C(G − 2 + K, K − 1) multisets for K classes,
    a few hundred for the book's worlds even at G = 16.  ``scale="batch"`` is the group's std for
    one prompt and is not accepted (say ``"group"``).
    """
    _check_per_completion(world, rewards, "rewards")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if scale not in SCALES or scale == "batch":
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    g = group_size
    max_len = world.horizon if max_len is None else max_len
    probs = probabilities(world, logits).detach().to(torch.float64)  # (M,)
    lengths = world.lengths  # (M,)
    pairs = torch.stack([rewards.detach().to(torch.float64), lengths], 1)  # (M, 2)
    classes, of = torch.unique(pairs, dim=0, return_inverse=True)  # (K, 2), (M,)
    k = classes.shape[0]
    class_probs = torch.zeros(k, dtype=torch.float64).index_add_(0, of, probs)  # (K,)
    counts, mult = _multisets(k, g - 1, class_probs)  # (S, K), (S,)
    # every (class of o_1, multiset of the others) as a group of G (class ids), (K·S, G)
    others = torch.repeat_interleave(torch.arange(k).expand(len(counts), k), counts.long().flatten()
                                     ).view(len(counts), g - 1)  # (S, G − 1)
    groups = torch.cat([torch.arange(k).repeat_interleave(len(counts))[:, None], others.repeat(k, 1)], 1)
    r, n = classes[groups, 0], classes[groups, 1]  # (K·S, G) rewards and lengths
    adv = group_advantages(r.flatten(), g, scale, eps, baseline=baseline).view(-1, g)  # (K·S, G)
    if loss_type == "grpo":
        a = 1.0 / (g * n[:, 0])
    elif loss_type == "dapo":
        a = 1.0 / n.sum(1)
    else:
        a = torch.full_like(n[:, 0], 1.0 / (g * max_len))
    per_class = ((a * adv[:, 0]).view(k, -1) * mult).sum(1)  # (K,): E[a_1 Â_1 | class of o_1]
    # E[Σ_i a_i Â_i ∇log π(o_i)] = G · Σ_o π(o) · E[a_1 Â_1 | o_1 = o] · ∇log π(o)
    c = (g * per_class[of])[:, None].expand_as(world.mask).to(logits.dtype)  # (M, H)
    return gradient_moments(score_gradients(world, logits, c), probs.to(logits.dtype)).mean


# --------------------------------------------------------------------------- the KL-regularised optimum


def regularised_objective(
    world: SequenceWorld, logits: torch.Tensor, ref_logits: torch.Tensor, rewards: torch.Tensor, beta: float
) -> torch.Tensor:
    """E_{π_θ}[r] − β · KL(π_θ ‖ π_ref) over completions, exactly (a differentiable scalar)."""
    return expected_reward(world, logits, rewards) - beta * sequence_kl(world, logits, ref_logits)


def policy_logits(world: SequenceWorld, probs: torch.Tensor) -> torch.Tensor:
    """A logit table [P, V] whose policy gives completion o the probability ``probs`` [M] (all > 0).

    Row o_<t holds log Pr(o_<t, then v), the probability that a completion starts with o_<t
    followed by v; its softmax is Pr(v | o_<t), so the chain rule gives back ``probs``.
    """
    _check_per_completion(world, probs, "probs")
    if not bool((probs > 0).all()):
        raise ValueError("probs must be > 0 (a softmax policy gives every completion some probability)")
    table = torch.zeros(world.num_prefixes, world.vocab_size, dtype=probs.dtype)
    weight = (probs[:, None] * world.mask.to(probs.dtype))  # (M, H)
    table.index_put_((world.prefix, world.tokens), weight, accumulate=True)  # Pr(o_<t ⊕ v)
    return table.log()


@dataclass(frozen=True)
class Optimum:
    """The maximiser of E_π[r] − β·KL(π ‖ π_ref) over all distributions on the completions."""

    probs: torch.Tensor
    """π*(o), [M]"""
    logits: torch.Tensor
    """a logit table [P, V] of the tabular policy whose completions have probabilities π*"""
    expected_reward: float
    """E_{π*}[r]"""
    kl: float
    """KL(π* ‖ π_ref), nats"""
    objective: float
    """E_{π*}[r] − β·KL(π* ‖ π_ref) = β·log Z, the largest value the objective takes"""


def kl_regularised_optimum(
    world: SequenceWorld, ref_logits: torch.Tensor, rewards: torch.Tensor, beta: float
) -> Optimum:
    """The closed-form optimum of the KL-regularised objective (β > 0)::

        π*(o) = π_ref(o) · exp(r(o)/β) / Z,     Z = Σ_o π_ref(o) · exp(r(o)/β)

    Because E_π[r] − β KL(π ‖ π_ref) = β log Z − β KL(π ‖ π*) for every π, and a KL is ≥ 0 and 0
    only at π = π*: the maximum is β log Z, reached at π* alone.  Small β puts π* on the best
    completions, large β keeps it at π_ref.
    """
    _check_logits(world, ref_logits, "ref_logits")
    _check_per_completion(world, rewards, "rewards")
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    with torch.no_grad():
        log_ref = sequence_logprobs(world, ref_logits.to(torch.float64))  # (M,)
        r = rewards.to(torch.float64)
        log_z = torch.logsumexp(log_ref + r / beta, 0)
        log_star = log_ref + r / beta - log_z  # (M,)
        probs = log_star.exp()
        kl = probs @ (log_star - log_ref)
        reward = probs @ r
    return Optimum(probs, policy_logits(world, probs), float(reward), float(kl), float(beta * log_z))
