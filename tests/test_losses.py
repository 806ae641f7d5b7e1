"""minigrpo.losses: each term against a transcription of its formula, golden values, invariants."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigrpo.logprobs import token_logprobs_and_entropy
from minigrpo.losses import (
    CISPO_EPS_HIGH,
    ROLLOUT_CORRECTIONS,
    ROLLOUT_METRICS,
    LossOutput,
    aggregate,
    aggregation_normalizer,
    clipped_surrogate,
    grpo_loss,
    importance_ratio,
    kl_penalty,
    off_policy_mask,
    rollout_weight,
)

LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]
RATIO_LEVELS = ["token", "sequence"]
ESTIMATORS = ["k1", "k2", "k3"]
F64 = torch.float64


# --------------------------------------------------------------------------- transcription


def transcribed_loss(lp, old, adv, mask, ref, ent, *, beta, alpha, eps_low, eps_high, loss_type,
                     ratio_level, estimator, max_len=None, surrogate="clip", kl_bias_correction=False,
                     rollout=None, rollout_correction=None, rollout_ratio_min=None, rollout_ratio_max=3.0,
                     off_policy_mask_threshold=None):  # fmt: skip
    """grpo_loss written out with Python loops over i and t, one scalar at a time."""
    n, t_len = lp.shape
    old, ref = old.detach(), None if ref is None else ref.detach()
    tokens = [[t for t in range(t_len) if mask[i][t]] for i in range(n)]
    zero = torch.zeros((), dtype=lp.dtype)

    def agg(term):
        if loss_type == "grpo":
            return sum((sum((term(i, t) for t in tokens[i]), zero) / max(len(tokens[i]), 1) for i in range(n)), zero) / n
        total = sum((term(i, t) for i in range(n) for t in tokens[i]), zero)
        if loss_type == "dapo":
            return total / max(sum(map(len, tokens)), 1)
        return total / (n * (max_len or t_len))

    def rho(i, t):
        if ratio_level == "token":
            return torch.exp(lp[i, t] - old[i, t])
        return torch.exp(sum((lp[i, u] - old[i, u] for u in tokens[i]), zero) / max(len(tokens[i]), 1))

    def pg(i, t):
        r, a = rho(i, t), float(adv[i])
        if surrogate == "cispo":  # −sg(min(ρ, 1 + ε_high)) · Â · log π
            weight = min(r.item(), 1 + eps_high)
            return -weight * a * lp[i, t]
        if r.item() > 1 + eps_high:
            clipped = torch.tensor(1 + eps_high, dtype=lp.dtype)
        elif r.item() < 1 - eps_low:
            clipped = torch.tensor(1 - eps_low, dtype=lp.dtype)
        else:
            clipped = r
        return -(r * a if (r * a).item() <= (clipped * a).item() else clipped * a)

    def d(i, u):  # log π_old − log π_rollout, 0 where the sampler gave no log-prob (NaN)
        x = old[i, u].item() - rollout[i, u].item()
        return 0.0 if math.isnan(x) else x

    def w(i, t):  # the rollout correction, a plain float: no gradient
        if rollout_correction is None:
            return 1.0
        log_w = d(i, t) if rollout_correction.startswith("token") else sum(d(i, u) for u in tokens[i])
        value = math.exp(log_w)
        lo = -math.inf if rollout_ratio_min is None else rollout_ratio_min
        hi = math.inf if rollout_ratio_max is None else rollout_ratio_max
        if rollout_correction.endswith("truncate"):
            return min(max(value, lo), hi)
        return 0.0 if value < lo or value > hi else value

    def kept(i):  # DeepSeek-V3.2 eq. 9: Â ≥ 0, or the mean gap log π_rollout − log π_θ ≤ δ
        if off_policy_mask_threshold is None or adv[i].item() >= 0:
            return True
        sampled = old if rollout is None else rollout
        gaps = [sampled[i, u].item() - lp[i, u].item() for u in tokens[i]]
        return sum(0.0 if math.isnan(g) else g for g in gaps) / max(len(tokens[i]), 1) <= off_policy_mask_threshold

    def corrected_pg(i, t):
        return w(i, t) * pg(i, t) if kept(i) else zero

    def kl(i, t):
        d = ref[i, t] - lp[i, t]
        k = {"k1": -d, "k2": d**2 / 2, "k3": torch.exp(d) - d - 1}[estimator]
        return rho(i, t) * k if kl_bias_correction else k

    loss = agg(corrected_pg)
    if beta:
        loss = loss + beta * agg(kl)
    if alpha:
        loss = loss - alpha * agg(lambda i, t: ent[i, t])
    return loss


def make_batch(seed=0, n=4, t=5, dtype=F64, garbage=7.0):
    """Log-probs with ratios away from the clip edges, a ragged mask and garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g, dtype=dtype) * 3
    steps = torch.tensor([-0.7, -0.35, -0.1, 0.0, 0.08, 0.4, 0.6], dtype=dtype)  # log ρ
    lp = old + steps[torch.randint(0, len(steps), (n, t), generator=g)]
    ref = old + 0.3 * torch.randn(n, t, generator=g, dtype=dtype)
    ent = torch.rand(n, t, generator=g, dtype=dtype) * 2
    adv = torch.tensor([1.0, -0.5, 0.0, -1.5, 2.0, 0.7][:n], dtype=dtype)
    lengths = torch.tensor([t, 2, 3, 1, 0, 4][:n])
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (N, T); row 4 (if any) is empty
    for x in (lp, old, ref, ent):
        x[~mask] = garbage
    return lp, old, adv, mask, ref, ent


def seq_ratio_margin(lp, old, mask, eps):
    log_ratio = torch.where(mask, lp - old, 0).sum(1) / mask.sum(1).clamp(min=1)
    r = log_ratio.exp()
    return torch.minimum((r - (1 - eps)).abs(), (r - (1 + eps)).abs()).min().item()


COMBOS = list(itertools.product(LOSS_TYPES, RATIO_LEVELS, ESTIMATORS))


@pytest.mark.parametrize("loss_type, ratio_level, estimator", COMBOS)
def test_grpo_loss_matches_transcription(loss_type, ratio_level, estimator):
    lp, old, adv, mask, ref, ent = make_batch(seed=1)
    assert seq_ratio_margin(lp, old, mask, 0.2) > 1e-3
    kwargs = dict(beta=0.04, alpha=0.01, eps_low=0.2, eps_high=0.28, loss_type=loss_type,
                  ratio_level=ratio_level)  # fmt: skip
    max_len = 7 if loss_type == "dr_grpo" else None
    lp1, ent1 = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    out = grpo_loss(lp1, old, adv, mask, ref_logprobs=ref, entropy=ent1, kl_estimator=estimator, max_len=max_len, **kwargs)
    lp2, ent2 = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    want = transcribed_loss(lp2, old, adv, mask, ref, ent2, estimator=estimator, max_len=max_len, **kwargs)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(out.loss, (lp1, ent1))
    want_grads = torch.autograd.grad(want, (lp2, ent2))
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("surrogate, ratio_level, kl_bias_correction",
                         [("cispo", "token", False), ("cispo", "token", True), ("clip", "token", True),
                          ("clip", "sequence", True)])
def test_cispo_and_corrected_kl_match_transcription(loss_type, surrogate, ratio_level, kl_bias_correction):
    lp, old, adv, mask, ref, ent = make_batch(seed=5)
    kwargs = dict(beta=0.04, alpha=0.01, eps_low=0.2, eps_high=0.28, loss_type=loss_type, ratio_level=ratio_level,
                  surrogate=surrogate, kl_bias_correction=kl_bias_correction)
    max_len = 7 if loss_type == "dr_grpo" else None
    lp1, ent1 = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    out = grpo_loss(lp1, old, adv, mask, ref_logprobs=ref, entropy=ent1, max_len=max_len, **kwargs)
    lp2, ent2 = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    want = transcribed_loss(lp2, old, adv, mask, ref, ent2, estimator="k3", max_len=max_len, **kwargs)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(out.loss, (lp1, ent1)), torch.autograd.grad(want, (lp2, ent2))):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if surrogate == "clip":  # CISPO's stop-gradient weight makes finite differences disagree by design
        lp3 = lp.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: grpo_loss(x, old, adv, mask, ref_logprobs=ref, max_len=max_len, **{**kwargs, "alpha": 0.0}).loss,
            (lp3,), fast_mode=True)


def test_cispo_keeps_the_gradient_of_tokens_ppo_clips():
    """ρ = 1.5 > 1 + ε with Â > 0: PPO's clip gives that token no gradient, CISPO (cap
    1 + ε_high = 1.2 here) gives it −min(ρ, 1 + ε_high)·Â (the capped weight), and at ρ ≡ 1 the
    two gradients agree."""
    old = torch.zeros(1, 2, dtype=F64)
    lp = torch.tensor([[math.log(1.5), 0.0]], dtype=F64, requires_grad=True)
    adv, mask = torch.tensor([2.0], dtype=F64), torch.ones(1, 2, dtype=torch.bool)
    clip_grad, = torch.autograd.grad(grpo_loss(lp, old, adv, mask, loss_type="dapo").loss, lp)
    cispo_grad, = torch.autograd.grad(
        grpo_loss(lp, old, adv, mask, loss_type="dapo", surrogate="cispo", eps_high=0.2).loss, lp)
    assert clip_grad[0, 0].item() == 0 and cispo_grad[0, 0].item() == pytest.approx(-1.2 * 2.0 / 2)
    assert clip_grad[0, 1].item() == pytest.approx(-2.0 / 2)  # ρ = 1: the same gradient
    assert cispo_grad[0, 1].item() == pytest.approx(-2.0 / 2)
    with pytest.raises(ValueError, match="ratio_level"):
        grpo_loss(lp, old, adv, mask, surrogate="cispo", ratio_level="sequence")
    with pytest.raises(ValueError, match="surrogate"):
        grpo_loss(lp, old, adv, mask, surrogate="ppo")


@pytest.mark.parametrize("loss_type, ratio_level, estimator", COMBOS)
def test_grpo_loss_gradcheck(loss_type, ratio_level, estimator):
    lp, old, adv, mask, ref, ent = make_batch(seed=2, n=3, t=4)
    assert seq_ratio_margin(lp, old, mask, 0.2) > 1e-3

    def loss(lp, ent):
        return grpo_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, beta=0.1, alpha=0.05,
                         loss_type=loss_type, ratio_level=ratio_level, kl_estimator=estimator).loss  # fmt: skip

    assert torch.autograd.gradcheck(loss, (lp.requires_grad_(), ent.requires_grad_()), fast_mode=True)


def test_terms_match_transcriptions():
    lp, old, adv, mask, ref, ent = make_batch(seed=3)
    n, t_len = lp.shape
    for estimator in ESTIMATORS:
        got = kl_penalty(lp, ref, estimator)
        for i, t in itertools.product(range(n), range(t_len)):
            d = ref[i, t].item() - lp[i, t].item()
            want = {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1}[estimator]
            assert got[i, t].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    ratio = importance_ratio(lp, old, mask, "token")
    for i, t in itertools.product(range(n), range(t_len)):
        assert ratio[i, t].item() == pytest.approx(math.exp(lp[i, t].item() - old[i, t].item()), rel=1e-12)
    pg = clipped_surrogate(ratio, adv, 0.2, 0.28)
    for i, t in itertools.product(range(n), range(t_len)):
        r, a = ratio[i, t].item(), adv[i].item()
        assert pg[i, t].item() == pytest.approx(-min(r * a, min(max(r, 0.8), 1.28) * a), rel=1e-12)
    seq = importance_ratio(lp, old, mask, "sequence")
    for i in range(n):
        logs = [lp[i, t].item() - old[i, t].item() for t in range(t_len) if mask[i, t]]
        want = math.exp(sum(logs) / max(len(logs), 1))
        assert all(seq[i, t].item() == pytest.approx(want, rel=1e-12) for t in range(t_len))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_matches_transcription(loss_type):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, generator=g, dtype=F64)
    mask = torch.rand(5, 6, generator=g) < 0.6
    mask[2] = False  # an empty completion
    rows = [[x[i, t].item() for t in range(6) if mask[i, t]] for i in range(5)]
    if loss_type == "grpo":
        want = sum(sum(r) / max(len(r), 1) for r in rows) / 5
    elif loss_type == "dapo":
        want = sum(map(sum, rows)) / sum(map(len, rows))
    else:
        want = sum(map(sum, rows)) / (5 * 9)
    got = aggregate(x, mask, loss_type, max_len=9 if loss_type == "dr_grpo" else None)
    assert got.item() == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- golden values


def test_golden_clipped_surrogate():
    ratio = torch.tensor([[1.3, 1.1, 0.7, 0.7, 1.3]], dtype=F64)
    adv = torch.tensor([1.0], dtype=F64)
    # ρ=1.3, Â=1: min(1.3, 1.2) = 1.2 → −1.2;  ρ=1.1: −1.1;  ρ=0.7, Â=1: min(0.7, 0.8) = 0.7 → −0.7
    want = torch.tensor([[-1.2, -1.1, -0.7, -0.7, -1.2]], dtype=F64)
    torch.testing.assert_close(clipped_surrogate(ratio, adv, 0.2, 0.2), want)
    # Â = −1: ρ=1.3 → min(−1.3, −1.2) = −1.3 → 1.3;  ρ=0.7 → min(−0.7, −0.8) = −0.8 → 0.8
    want = torch.tensor([[1.3, 1.1, 0.8, 0.8, 1.3]], dtype=F64)
    torch.testing.assert_close(clipped_surrogate(ratio, -adv, 0.2, 0.2), want)
    # clip-higher (DAPO): ε_high = 0.28 lets ρ = 1.3 count up to 1.28
    torch.testing.assert_close(clipped_surrogate(ratio[:, :1], adv, 0.2, 0.28), torch.tensor([[-1.28]], dtype=F64))


def test_golden_kl():
    """π_θ(o) = 0.5, π_ref(o) = 0.25: d = log 0.5 = −0.6931."""
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([0.693147]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([0.240227]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([0.193147]))  # 0.5 + 0.6931 − 1


def test_golden_aggregate():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(x, mask, "grpo").item() == pytest.approx(3.0)  # (6/3 + 4/1) / 2
    assert aggregate(x, mask, "dapo").item() == pytest.approx(2.5)  # 10 / 4
    assert aggregate(x, mask, "dr_grpo").item() == pytest.approx(10 / 6)  # 10 / (2 · 3)
    assert aggregate(x, mask, "dr_grpo", max_len=5).item() == pytest.approx(1.0)  # 10 / (2 · 5)


def test_golden_grpo_loss():
    """Two completions, by hand.  Row 0: ρ = (1.3, 1.0), Â = 1; row 1: ρ = 0.7 (+ padding), Â = −1.
    pg = (−1.2, −1.0 | 0.8); "grpo": ((−1.2 − 1.0)/2 + 0.8)/2 = −0.15.
    KL with log π_ref = log π_θ − log 2 at every token: d = −log 2, k3 = 0.5 + log 2 − 1 = 0.1931.
    Entropy (0.5, 1.5 | 1.0): 1.0.  loss = −0.15 + 0.1·0.1931 − 0.01·1.0 = −0.140685."""
    old = torch.log(torch.tensor([[0.5, 0.4], [0.5, 0.3]], dtype=F64))
    lp = old + torch.log(torch.tensor([[1.3, 1.0], [0.7, 5.0]], dtype=F64))
    ref = lp - math.log(2)
    ent = torch.tensor([[0.5, 1.5], [1.0, 9.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    out = grpo_loss(lp, old, torch.tensor([1.0, -1.0], dtype=F64), mask, ref_logprobs=ref, entropy=ent, beta=0.1, alpha=0.01)
    assert out.policy_loss.item() == pytest.approx(-0.15)
    assert out.kl.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert out.entropy.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(-0.15 + 0.1 * (math.log(2) - 0.5) - 0.01)
    assert out.metrics["clip_frac_high"] == pytest.approx(1 / 3)  # ρ = 1.3 > 1.2 with Â > 0
    assert out.metrics["clip_frac_low"] == pytest.approx(1 / 3)  # ρ = 0.7 < 0.8 with Â < 0
    assert out.metrics["clip_frac"] == pytest.approx(2 / 3)
    assert out.metrics["ratio_mean"] == pytest.approx(1.0)
    assert out.metrics["ratio_min"] == pytest.approx(0.7)
    assert out.metrics["ratio_max"] == pytest.approx(1.3)
    assert out.metrics["kl_token_mean"] == pytest.approx(math.log(2) - 0.5)
    assert out.metrics["entropy_token_mean"] == pytest.approx(1.0)


def test_loss_output_fields():
    lp, old, adv, mask, ref, ent = make_batch()
    out = grpo_loss(lp.requires_grad_(), old, adv, mask)
    assert isinstance(out, LossOutput)
    assert out.loss.requires_grad and out.loss.dim() == 0
    assert not out.policy_loss.requires_grad and out.kl is None and out.entropy is None
    assert all(isinstance(v, float) for v in out.metrics.values())
    assert {"clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "ratio_min", "ratio_max"} <= set(out.metrics)
    out = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent.requires_grad_())
    assert not out.kl.requires_grad and not out.entropy.requires_grad
    assert {"kl_token_mean", "entropy_token_mean"} <= set(out.metrics)


# --------------------------------------------------------------------------- properties


@st.composite
def batches(draw, max_n=4, max_t=5):
    n, t = draw(st.integers(1, max_n)), draw(st.integers(1, max_t))
    floats = st.floats(-3, 0)
    old = torch.tensor(draw(st.lists(floats, min_size=n * t, max_size=n * t)), dtype=F64).view(n, t)
    shift = torch.tensor(draw(st.lists(st.floats(-1, 1), min_size=n * t, max_size=n * t)), dtype=F64).view(n, t)
    adv = torch.tensor(draw(st.lists(st.floats(-2, 2), min_size=n, max_size=n)), dtype=F64)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n * t, max_size=n * t))).view(n, t)
    return old + shift, old, adv, mask


settings_ = settings(max_examples=40, deadline=None)
options = st.fixed_dictionaries(
    {"loss_type": st.sampled_from(LOSS_TYPES), "ratio_level": st.sampled_from(RATIO_LEVELS),
     "eps_low": st.sampled_from([0.1, 0.2]), "eps_high": st.sampled_from([None, 0.28])}  # fmt: skip
)


@settings_
@given(batches(), options)
def test_zero_advantages_give_zero_policy_gradient(batch, opts):
    lp, old, adv, mask = batch
    lp.requires_grad_()
    out = grpo_loss(lp, old, torch.zeros_like(adv), mask, **opts)
    assert out.loss.item() == 0.0
    assert (torch.autograd.grad(out.loss, lp)[0] == 0).all()


@settings_
@given(batches(), options)
def test_old_equals_current_gives_ratio_one(batch, opts):
    lp, _, adv, mask = batch
    out = grpo_loss(lp, lp.clone(), adv, mask, **opts)
    m = out.metrics
    assert m["ratio_mean"] == m["ratio_min"] == m["ratio_max"] == 1.0
    assert m["clip_frac_low"] == m["clip_frac_high"] == m["clip_frac"] == 0.0


@settings_
@given(batches(), options, st.sampled_from(ESTIMATORS))
def test_beta_alpha_zero_is_the_policy_loss(batch, opts, estimator):
    lp, old, adv, mask = batch
    ref, ent = lp + 30.0, torch.rand_like(lp)  # a far reference: a large KL that must not leak in
    out = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, kl_estimator=estimator, **opts)
    eps_high = opts["eps_high"] if opts["eps_high"] is not None else opts["eps_low"]
    lp0, old0 = torch.where(mask, lp, 0), torch.where(mask, old, 0)
    ratio = importance_ratio(lp0, old0, mask, opts["ratio_level"])
    pg = aggregate(clipped_surrogate(ratio, adv, opts["eps_low"], eps_high), mask, opts["loss_type"])
    assert torch.equal(out.loss, pg) and torch.equal(out.policy_loss, pg)


@settings_
@given(batches(), st.sampled_from([0.1, 0.2]))
def test_clipped_tokens_have_exactly_zero_gradient(batch, eps):
    lp, old, adv, mask = batch
    ratio = (lp - old).exp()
    near_edge = ((ratio - (1 - eps)).abs() < 1e-6) | ((ratio - (1 + eps)).abs() < 1e-6)
    lp.requires_grad_()
    out = grpo_loss(lp, old, adv, mask, eps_low=eps, loss_type="dapo")
    grad = torch.autograd.grad(out.loss, lp)[0]
    a = adv[:, None].expand_as(ratio)
    clipped = ((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))
    zero_expected = clipped | (a == 0) | ~mask
    underflow = a.abs() < 1e-300  # Â·ρ/Σm of a denormal Â (hypothesis draws 5e-324) rounds to 0
    assert (grad[zero_expected & ~near_edge] == 0).all()
    assert (grad[~zero_expected & ~near_edge & ~underflow] != 0).all()


FILLS = [0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan"), "random"]


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("loss_type, ratio_level, estimator", COMBOS[::2])
def test_padding_never_matters(fill, loss_type, ratio_level, estimator):
    lp, old, adv, mask, ref, ent = make_batch(seed=5, garbage=0.0)

    def run(lp, old, ref, ent):
        lp, ent = lp.clone().requires_grad_(), ent.clone().requires_grad_()
        out = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, beta=0.1, alpha=0.05,
                        loss_type=loss_type, ratio_level=ratio_level, kl_estimator=estimator)  # fmt: skip
        return (out.loss, *torch.autograd.grad(out.loss, (lp, ent))), out.metrics

    clean, clean_metrics = run(lp, old, ref, ent)
    g = torch.Generator().manual_seed(6)
    dirty = []
    for x in (lp, old, ref, ent):
        value = 100 * torch.randn(x.shape, generator=g, dtype=F64) if fill == "random" else torch.full_like(x, fill)
        dirty.append(torch.where(mask, x, value))
    got, got_metrics = run(*dirty)
    for a, b in zip(clean, got):
        assert torch.equal(a, b)
    assert got_metrics == clean_metrics


@settings(max_examples=100, deadline=None)
@given(st.floats(-60, 60), st.floats(-60, 0), st.sampled_from([torch.float32, F64]))
def test_k2_k3_are_nonnegative(d, lp, dtype):
    logprobs = torch.tensor([lp], dtype=dtype)
    ref = logprobs + torch.tensor([d], dtype=dtype)
    assert (kl_penalty(logprobs, ref, "k2") >= 0).all()
    assert (kl_penalty(logprobs, ref, "k3") >= 0).all()


@settings_
@given(st.integers(1, 5), st.integers(1, 6), st.data())
def test_aggregate_weights(n, t, data):
    """dapo: every token weighs 1/(total tokens); grpo: every non-empty sequence weighs 1/N."""
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n * t, max_size=n * t))).view(n, t)
    x = torch.randn(n, t, dtype=F64, requires_grad=True)
    dapo = torch.autograd.grad(aggregate(x, mask, "dapo"), x)[0]
    assert torch.equal(dapo[mask], torch.full_like(dapo[mask], 1 / max(mask.sum().item(), 1)))
    grpo = torch.autograd.grad(aggregate(x, mask, "grpo"), x)[0]
    per_sequence = grpo.sum(1)
    nonempty = mask.any(1)
    torch.testing.assert_close(per_sequence[nonempty], torch.full_like(per_sequence[nonempty], 1 / n))
    assert (grpo[~mask] == 0).all() and (dapo[~mask] == 0).all()


def test_grpo_aggregation_has_a_length_bias():
    """One short and one long completion, same per-token loss: "grpo" gives each token of the
    short one more weight; "dapo" and "dr_grpo" weigh all tokens alike."""
    x = torch.ones(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    grad = torch.autograd.grad(aggregate(x, mask, "grpo"), x)[0]
    assert grad[0, 0] == pytest.approx(0.5) and grad[1, 0] == pytest.approx(0.125)
    for loss_type in ("dapo", "dr_grpo"):
        grad = torch.autograd.grad(aggregate(x, mask, loss_type), x)[0]
        assert grad[0, 0] == grad[1, 0]


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("loss_type, ratio_level", list(itertools.product(LOSS_TYPES, RATIO_LEVELS)))
def test_all_padding_rows_are_finite(loss_type, ratio_level):
    lp, old, adv, mask, ref, ent = make_batch(seed=7, n=5, garbage=float("nan"))
    assert not mask[4].any()
    for m in (mask, torch.zeros_like(mask)):  # one empty completion; an all-empty batch
        x = lp.clone().requires_grad_()
        out = grpo_loss(x, old, adv, m, ref_logprobs=ref, entropy=ent, beta=0.1, alpha=0.01,
                        loss_type=loss_type, ratio_level=ratio_level)  # fmt: skip
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
        assert all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extreme_logits_and_bf16_through_the_loss(dtype):
    """Logits of ±1e4 (in bf16 too) → log-probs → loss: everything finite."""
    g = torch.Generator().manual_seed(8)
    logits = (1e4 * torch.randn(4, 6, 11, generator=g).sign()).to(dtype).requires_grad_()
    tokens = logits.detach().float().argmax(-1)
    tokens[0, :3] = torch.randint(0, 11, (3,), generator=g)  # some unlikely tokens too
    lp, ent = token_logprobs_and_entropy(logits, tokens)
    ref_logits = logits.detach().float() + 0.01 * torch.randn(logits.shape, generator=g)
    ref, _ = token_logprobs_and_entropy(ref_logits, tokens)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = grpo_loss(lp, lp.detach(), torch.tensor([1.0, -1.0, 0.5, 0.0]), mask, ref_logprobs=ref, entropy=ent,
                    beta=0.04, alpha=0.001)  # fmt: skip
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad.float()).all()


def test_bf16_logprobs_are_upcast():
    lp, old, adv, mask, ref, ent = make_batch(seed=9, dtype=torch.float32)
    out = grpo_loss(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, ref_logprobs=ref.bfloat16(), beta=0.1)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_old_and_ref_are_constants():
    lp, old, adv, mask, ref, _ = make_batch(seed=10)
    old, ref = old.requires_grad_(), ref.requires_grad_()
    out = grpo_loss(lp.requires_grad_(), old, adv, mask, ref_logprobs=ref, beta=0.1)
    out.loss.backward()
    assert old.grad is None and ref.grad is None and lp.grad is not None


# --------------------------------------------------------------------------- bad inputs


def _batch():
    lp, old, adv, mask, ref, ent = make_batch(seed=11, n=2, t=3)
    return dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref, entropy=ent)


BAD_GRPO = [
    ({"mask": torch.full((2, 3), 2)}, "mask"),
    ({"mask": torch.full((2, 3), 0.5)}, "mask"),
    ({"mask": torch.ones(2, 4)}, "mask"),
    ({"mask": torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]])}, "mask"),
    ({"logprobs": torch.zeros(2, 3, 1, dtype=F64)}, "logprobs"),
    ({"logprobs": torch.zeros(2, 3, dtype=torch.long)}, "logprobs"),
    ({"old_logprobs": torch.zeros(2, 4, dtype=F64)}, "old_logprobs"),
    ({"ref_logprobs": torch.zeros(3, 3, dtype=F64)}, "ref_logprobs"),
    ({"entropy": torch.zeros(2, 2, dtype=F64)}, "entropy"),
    ({"advantages": torch.zeros(2, 3, dtype=F64)}, "advantages"),
    ({"advantages": torch.zeros(3, dtype=F64)}, "advantages"),
    ({"advantages": torch.tensor([1.0, float("nan")], dtype=F64)}, "advantages"),
    ({"beta": 0.1, "ref_logprobs": None}, "ref_logprobs"),
    ({"alpha": 0.1, "entropy": None}, "entropy"),
    ({"beta": -0.1}, "beta"),
    ({"alpha": -0.1}, "alpha"),
    ({"eps_low": -0.1}, "eps_low"),
    ({"eps_low": 1.0}, "eps_low"),
    ({"eps_high": -0.1}, "eps_high"),
    ({"beta": float("nan")}, "beta"),
    ({"loss_type": "ppo"}, "loss_type"),
    ({"ratio_level": "sentence"}, "ratio_level"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"max_len": 2, "loss_type": "dr_grpo"}, "max_len"),
    ({"max_len": 3.5, "loss_type": "dr_grpo"}, "max_len"),
]


@pytest.mark.parametrize("change, match", BAD_GRPO)
def test_grpo_loss_bad_inputs(change, match):
    kwargs = {**_batch(), **change}
    args = [kwargs.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        grpo_loss(*args, **kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda b: kl_penalty(b["logprobs"], b["ref_logprobs"][:1]), "ref_logprobs"),
        (lambda b: kl_penalty(b["logprobs"], b["ref_logprobs"], "kl"), "estimator"),
        (lambda b: kl_penalty(b["logprobs"].long(), b["ref_logprobs"]), "logprobs"),
        (lambda b: aggregate(b["logprobs"], b["mask"][:, :2]), "mask"),
        (lambda b: aggregate(b["logprobs"], b["mask"].float() * 3), "mask"),
        (lambda b: aggregate(b["logprobs"], b["mask"], "mean"), "loss_type"),
        (lambda b: aggregate(b["logprobs"], b["mask"], "dr_grpo", max_len=0), "max_len"),
        (lambda b: aggregate(b["logprobs"][0], b["mask"][0]), "per_token"),
    ],
)
def test_term_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(_batch())


def test_masks_of_every_dtype_agree():
    lp, old, adv, mask, _, _ = make_batch(seed=12)
    losses = [grpo_loss(lp, old, adv, mask.to(dtype)).loss for dtype in (torch.bool, torch.int64, torch.uint8, F64)]
    assert all(torch.equal(losses[0], x) for x in losses)


def test_metrics_split_completion_lengths_by_the_advantage_sign():
    """The mean |o_i| over completions with Â > 0 and over those with Â < 0 (None where there
    are none): the two lengths Dr. GRPO's length-bias argument compares."""
    lp = torch.zeros(4, 5, dtype=F64)
    mask = torch.arange(5) < torch.tensor([5, 1, 3, 2])[:, None]  # |o_i| = 5, 1, 3, 2
    out = grpo_loss(lp, lp, torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=F64), mask)
    assert out.metrics["completion_tokens_pos_adv"] == 3.0 and out.metrics["completion_tokens_neg_adv"] == 3.0
    assert out.metrics["completion_tokens_mean"] == 11 / 4
    out = grpo_loss(lp, lp, torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=F64), mask)
    assert out.metrics["completion_tokens_neg_adv"] is None


def test_cispo_caps_the_weight_at_five_by_default_and_counts_every_capped_token():
    """Without eps_high CISPO's cap is 1 + 4 = 5 (ScaleRL's ε_max, TRL's recommendation), not
    1 + ε_low; ``clip_frac_high`` counts the tokens whose weight the cap changed, whatever Â's
    sign (the cap acts on both)."""
    assert CISPO_EPS_HIGH == 4.0
    old = torch.zeros(2, 3, dtype=F64)
    lp = torch.log(torch.tensor([[7.0, 1.5, 1.0], [7.0, 1.0, 1.0]], dtype=F64)).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0], dtype=F64), torch.ones(2, 3, dtype=torch.bool)
    out = grpo_loss(lp, old, adv, mask, loss_type="dapo", surrogate="cispo")
    grad, = torch.autograd.grad(out.loss, lp)
    # d/d logp of −w·Â·logp / 6 with w = min(ρ, 5): the ρ = 7 tokens get weight 5, ρ = 1.5 keeps 1.5
    torch.testing.assert_close(grad, -torch.tensor([[5.0, 1.5, 1.0], [-5.0, -1.0, -1.0]], dtype=F64) / 6)
    assert out.metrics["clip_frac_high"] == 2 / 6 and out.metrics["clip_frac_low"] == 0.0
    assert out.metrics["clip_frac"] == 2 / 6


def _pieces_of(n, sizes):
    """Consecutive row slices of the given sizes covering n rows."""
    bounds = list(itertools.accumulate([0, *sizes]))
    assert bounds[-1] == n
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("variant", [dict(), dict(ratio_level="sequence"), dict(surrogate="cispo"),
                                     dict(kl_bias_correction=True, kl_estimator="k2"),
                                     dict(rollout_correction="token_truncate", rollout_ratio_min=0.8,
                                          rollout_ratio_max=1.2),
                                     dict(rollout_correction="sequence_mask", rollout_ratio_min=0.5,
                                          off_policy_mask_threshold=0.0)], ids=str)
def test_pieces_with_the_whole_normalizer_add_up_to_the_whole_loss(loss_type, variant):
    """Split into pieces (micro-batches, ranks), each ``grpo_loss`` divided by the whole batch's
    ``aggregation_normalizer`` (the sum of the pieces'): the losses and the gradients add up to
    the whole batch's, for every term (policy, KL and entropy), while each piece's own
    normaliser does not give the same (the bug this guards against).  With a rollout
    correction too: w (a row's own) multiplies each token before aggregation."""
    g = torch.Generator().manual_seed(7)
    n, t = 6, 5
    old = -torch.rand(n, t, generator=g, dtype=F64)
    lp0 = old + 0.3 * torch.randn(n, t, generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(n, t, generator=g, dtype=F64)
    ent0 = torch.rand(n, t, generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64)
    mask = torch.arange(t) < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]
    rollout = old + 0.5 * torch.randn(n, t, generator=g, dtype=F64) if "rollout_correction" in variant else None
    kw = dict(beta=0.1, alpha=0.01, loss_type=loss_type, max_len=8, **variant)

    def run(pieces, normalizer):
        lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
        total = sum(grpo_loss(lp[r], old[r], adv[r], mask[r], ref_logprobs=ref[r], entropy=ent[r],
                              rollout_logprobs=None if rollout is None else rollout[r],
                              normalizer=normalizer(r), **kw).loss for r in pieces)
        return (total, *torch.autograd.grad(total, (lp, ent)))

    whole = run([slice(0, n)], lambda r: None)
    split = _pieces_of(n, [1, 3, 2])
    assert sum(aggregation_normalizer(mask[r], loss_type, 8) for r in split) == aggregation_normalizer(mask, loss_type, 8)
    total = aggregation_normalizer(mask, loss_type, 8)
    for got, want in zip(run(split, lambda r: total), whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    own = run(split, lambda r: None)  # each piece its own denominator: a different function
    assert not torch.allclose(own[1], whole[1])


def test_normalizer_must_be_positive():
    x, m = torch.ones(2, 3), torch.ones(2, 3)
    for bad in (0, -1.0, math.inf, math.nan, True, "3"):
        with pytest.raises(ValueError, match="normalizer"):
            aggregate(x, m, normalizer=bad)


# --------------------------------------------------------------------------- rollout correction


CORRECTIONS = list(ROLLOUT_CORRECTIONS)
DELTA = 0.2  # δ of the off-policy mask in rollout_batch: it drops row 3 (with rollout or old log-probs), keeps 1, 4, 5


def rollout_batch(seed=29, n=6, t=5):
    """make_batch plus a sampler's log-probs: log π_rollout = log π_old + noise, one NaN (no
    value) on a completion token, garbage in the padding; more completions with Â < 0 (row 4,
    empty, among them)."""
    lp, old, _, mask, ref, ent = make_batch(seed=seed, n=n, t=t)
    adv = torch.tensor([1.0, -0.5, 0.0, -1.5, -2.0, -0.7], dtype=F64)
    g = torch.Generator().manual_seed(seed + 100)
    rollout = old + 0.7 * torch.randn(n, t, generator=g, dtype=F64)
    rollout[0, 1] = float("nan")
    rollout[~mask] = -7.0
    return lp, old, adv, mask, ref, ent, rollout


def mean_gaps(sampled, lp, mask):
    """Σ_t m·(sampled − log π_θ) / max(Σ_t m, 1) per completion, NaN counted as 0, by loops."""
    n, t_len = lp.shape
    out = []
    for i in range(n):
        gaps = [sampled[i, t].item() - lp[i, t].item() for t in range(t_len) if mask[i, t]]
        out.append(sum(0.0 if math.isnan(x) else x for x in gaps) / max(len(gaps), 1))
    return out


def test_rollout_batch_exercises_every_branch():
    """The bounds [0.5, 2] cut weights on both sides, in token and sequence modes, and the
    off-policy mask drops one completion with Â < 0 (with either source) and keeps the others."""
    lp, old, adv, mask, _, _, rollout = rollout_batch()
    assert seq_ratio_margin(lp, old, mask, 0.2) > 1e-3
    for mode in ("token_truncate", "sequence_truncate"):
        w, outside = rollout_weight(old, torch.where(mask, rollout, 0), mask, mode, 0.5, 2.0)
        raw = rollout_weight(old, torch.where(mask, rollout, 0), mask, mode, None, None)[0]
        assert ((raw < 0.5) & mask).any() and ((raw > 2.0) & mask).any() and ((~outside) & mask).any()
        assert torch.equal(outside, (raw < 0.5) | (raw > 2.0)) and ((w >= 0.5) & (w <= 2.0)).all()
        assert ((raw - 0.5).abs()[mask].min() > 0.01) and ((raw - 2.0).abs()[mask].min() > 0.01)
    for sampled in (rollout, old):
        gaps = mean_gaps(sampled, lp, mask)
        dropped = [i for i in range(6) if adv[i] < 0 and gaps[i] > DELTA]
        assert dropped == [3] and min(abs(g - DELTA) for g in gaps) > 1e-2


ROLLOUT_CASES = [(mode, bounds, threshold) for mode in [None, *CORRECTIONS] for bounds in [(0.5, 2.0), (None, 3.0)]
                 for threshold in [None, DELTA] if mode is not None or bounds == (None, 3.0)]


def _rollout_id(case):
    mode, bounds, threshold = case
    return f"{mode}-{bounds[0]}-{bounds[1]}-{'opm' if threshold is not None else 'noopm'}"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=_rollout_id)
def test_rollout_correction_matches_transcription(loss_type, case):
    """w·keep·pg against the loops of ``transcribed_loss``: values and gradients, every mode and
    loss type, with and without the off-policy mask, KL and entropy in the loss."""
    mode, (lo, hi), threshold = case
    lp, old, adv, mask, ref, ent, rollout = rollout_batch()
    kwargs = dict(beta=0.04, alpha=0.01, eps_low=0.2, eps_high=0.28, loss_type=loss_type, ratio_level="token",
                  rollout_correction=mode, rollout_ratio_min=lo, rollout_ratio_max=hi,
                  off_policy_mask_threshold=threshold)
    max_len = 7 if loss_type == "dr_grpo" else None
    lp1, ent1 = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    out = grpo_loss(lp1, old, adv, mask, ref_logprobs=ref, entropy=ent1, max_len=max_len, rollout_logprobs=rollout,
                    **kwargs)
    lp2, ent2 = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    want = transcribed_loss(lp2, old, adv, mask, ref, ent2, estimator="k3", max_len=max_len, rollout=rollout, **kwargs)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(out.loss, (lp1, ent1)), torch.autograd.grad(want, (lp2, ent2))):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", CORRECTIONS)
@pytest.mark.parametrize("ratio_level, surrogate, sampled",
                         [("sequence", "clip", "rollout"), ("token", "cispo", "rollout"), ("token", "clip", "old")])
def test_rollout_correction_with_gspo_cispo_and_the_old_fallback(mode, ratio_level, surrogate, sampled):
    """The same transcription with GSPO's sequence ratio, with CISPO's weight, and with no rollout
    log-probs at all (no correction; the off-policy mask then measures the gap from π_old)."""
    lp, old, adv, mask, ref, ent, rollout = rollout_batch()
    if sampled == "old":
        rollout, mode = None, None
    kwargs = dict(beta=0.04, alpha=0.0, eps_low=0.2, eps_high=0.28, loss_type="dapo", ratio_level=ratio_level,
                  surrogate=surrogate, rollout_correction=mode, rollout_ratio_min=0.5, rollout_ratio_max=2.0,
                  off_policy_mask_threshold=DELTA)
    lp1, lp2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    out = grpo_loss(lp1, old, adv, mask, ref_logprobs=ref, rollout_logprobs=rollout, **kwargs)
    want = transcribed_loss(lp2, old, adv, mask, ref, ent, estimator="k3", rollout=rollout, **kwargs)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.loss, lp1)[0], torch.autograd.grad(want, lp2)[0],
                               rtol=1e-12, atol=1e-12)
    assert out.metrics["off_policy_masked_frac"] == 1 / 6


@pytest.mark.parametrize("mode", CORRECTIONS)
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_rollout_correction_gradcheck(mode, ratio_level):
    """Finite differences agree with autograd on the corrected, masked loss: w and the mask are
    constants in log π_θ (the mask's decisions sit far from δ, the ratios far from the clip edges)."""
    lp, old, adv, mask, ref, ent, rollout = rollout_batch()

    def loss(lp, ent):
        return grpo_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, beta=0.1, alpha=0.05,
                         ratio_level=ratio_level, rollout_logprobs=rollout, rollout_correction=mode,
                         rollout_ratio_min=0.5, rollout_ratio_max=2.0, off_policy_mask_threshold=DELTA).loss

    assert torch.autograd.gradcheck(loss, (lp.requires_grad_(), ent.requires_grad_()), fast_mode=True)


def test_golden_rollout_correction():
    """Two completions by hand, ρ = 1 (log π_θ = log π_old), so pg = −Â per token.
    Row 0 (Â = 1): raw w = (4, 0.8); row 1 (Â = −1): raw w = (1.5, NaN → 1).  C = [0.5, 3], "dapo".
    token_truncate: w = (3, 0.8 | 1.5, 1): (−3 − 0.8 + 1.5 + 1)/4 = −0.325; one token of four clamped.
    token_mask:     w = (0, 0.8 | 1.5, 1): (−0.8 + 2.5)/4 = 0.425.
    sequence_*:     w_0 = 4·0.8 = 3.2, w_1 = 1.5: truncate (−3·2 + 1.5·2)/4 = −0.75, mask (0 + 3)/4 = 0.75.
    Off-policy mask on row 1: mean gap (log π_rollout − log π_θ) = (−log 1.5 + 0)/2 = −0.2027:
    kept at δ = 0, dropped at δ = −0.3 (row 0 has Â > 0: always kept)."""
    old = torch.log(torch.tensor([[0.4, 0.5], [0.3, 0.6]], dtype=F64))
    raw = torch.tensor([[4.0, 0.8], [1.5, 1.0]], dtype=F64)
    rollout = old - raw.log()
    rollout[1, 1] = float("nan")
    adv, mask = torch.tensor([1.0, -1.0], dtype=F64), torch.ones(2, 2, dtype=torch.bool)

    def run(mode, **kw):
        return grpo_loss(old.clone(), old, adv, mask, loss_type="dapo", rollout_logprobs=rollout,
                         rollout_correction=mode, rollout_ratio_min=0.5, rollout_ratio_max=3.0, **kw)

    want = {"token_truncate": -0.325, "token_mask": 0.425, "sequence_truncate": -0.75, "sequence_mask": 0.75}
    for mode, value in want.items():
        assert run(mode).loss.item() == pytest.approx(value, rel=1e-12)
    m = run("token_truncate").metrics
    assert m["importance_sampling_ratio_min"] == pytest.approx(0.8) and m["importance_sampling_ratio_max"] == 3.0
    assert m["importance_sampling_ratio_mean"] == pytest.approx((3 + 0.8 + 1.5 + 1) / 4)
    assert m["importance_sampling_out_of_bounds_frac"] == 1 / 4
    logs = [math.log(4), -math.log(0.8), math.log(1.5)]  # |log π_rollout − log π_old|, NaN left out
    assert m["sampling_logp_difference_mean"] == pytest.approx(sum(logs) / 3)
    assert m["sampling_logp_difference_max"] == pytest.approx(math.log(4))
    assert m["sampling_seq_log_ratio_std"] == pytest.approx(abs(math.log(3.2) - math.log(1.5)) / 2)
    m = run("sequence_mask").metrics  # over completions: w = (0, 1.5); both tokens of row 0 zeroed
    assert (m["importance_sampling_ratio_min"], m["importance_sampling_ratio_max"]) == (0.0, pytest.approx(1.5))
    assert m["importance_sampling_ratio_mean"] == pytest.approx(0.75)
    assert m["importance_sampling_out_of_bounds_frac"] == 0.5
    assert run("token_mask", off_policy_mask_threshold=0.0).loss.item() == pytest.approx(0.425, rel=1e-12)
    dropped = run("token_mask", off_policy_mask_threshold=-0.3)
    assert dropped.loss.item() == pytest.approx(-0.8 / 4, rel=1e-12)  # row 1's tokens give 0
    assert dropped.metrics["off_policy_masked_frac"] == 0.5


def test_rollout_metrics_appear_only_when_asked_for_and_are_labelled():
    """No rollout log-probs, no mask: no new metric (existing runs log nothing new).  Rollout
    log-probs alone: the mismatch only.  Every name has an axis label; min/max reduce by min/max."""
    from minigrpo.metrics import METRICS, REDUCE_OVER_UPDATES

    lp, old, adv, mask, _, _, rollout = rollout_batch()
    assert not set(grpo_loss(lp, old, adv, mask).metrics) & set(ROLLOUT_METRICS)
    mismatch = {"sampling_logp_difference_mean", "sampling_logp_difference_max", "sampling_seq_log_ratio_std"}
    assert set(grpo_loss(lp, old, adv, mask, rollout_logprobs=rollout).metrics) & set(ROLLOUT_METRICS) == mismatch
    out = grpo_loss(lp, old, adv, mask, rollout_logprobs=rollout, rollout_correction="token_mask",
                    off_policy_mask_threshold=DELTA)
    assert set(ROLLOUT_METRICS) <= set(out.metrics) <= set(METRICS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())
    assert set(grpo_loss(lp, old, adv, mask, off_policy_mask_threshold=DELTA).metrics) & set(ROLLOUT_METRICS) == {
        "off_policy_masked_frac"}
    assert {k for k in ROLLOUT_METRICS if k.endswith(("_min", "_max"))} <= set(REDUCE_OVER_UPDATES)


rollout_options = st.fixed_dictionaries(
    {"loss_type": st.sampled_from(LOSS_TYPES), "ratio_level": st.sampled_from(RATIO_LEVELS),
     "rollout_correction": st.sampled_from(CORRECTIONS),
     "rollout_ratio_min": st.sampled_from([None, 0.1, 0.5, 1.0]),
     "rollout_ratio_max": st.sampled_from([None, 1.0, 2.0, 3.0])}
)


@settings_
@given(batches(), rollout_options)
def test_rollout_equal_to_old_changes_nothing(batch, opts):
    """π_rollout = π_old: w = 1 under any mode whose bounds contain 1, so loss and gradient are
    bit-identical to no correction."""
    lp, old, adv, mask = batch
    lp1, lp2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    plain = grpo_loss(lp1, old, adv, mask, loss_type=opts["loss_type"], ratio_level=opts["ratio_level"])
    corrected = grpo_loss(lp2, old, adv, mask, rollout_logprobs=old.clone(), **opts)
    assert torch.equal(plain.loss, corrected.loss)
    assert torch.equal(torch.autograd.grad(plain.loss, lp1)[0], torch.autograd.grad(corrected.loss, lp2)[0])
    assert corrected.metrics["importance_sampling_out_of_bounds_frac"] == 0.0


@st.composite
def rollouts(draw, like):
    noise = draw(st.lists(st.floats(-2, 2), min_size=like.numel(), max_size=like.numel()))
    nan = draw(st.lists(st.booleans(), min_size=like.numel(), max_size=like.numel()))
    rollout = like + torch.tensor(noise, dtype=F64).view_as(like)
    return torch.where(torch.tensor(nan).view_as(like), float("nan"), rollout)


@settings_
@given(batches(), rollout_options, st.data())
def test_w_is_a_constant_that_weighs_only_the_policy_term(batch, opts, data):
    """w carries no gradient (to π_old or π_rollout), each token's gradient is w times its
    uncorrected one (token ratios, the policy term alone), and the KL and entropy terms, their
    values and gradients, are the same with or without w."""
    lp, old, adv, mask = batch
    rollout = data.draw(rollouts(old))
    ref, ent = old + 0.3, torch.rand_like(lp)
    old1, rollout1 = old.clone().requires_grad_(), rollout.clone().requires_grad_()
    lp1, lp2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    token = {**opts, "ratio_level": "token"}
    out = grpo_loss(lp1, old1, adv, mask, rollout_logprobs=rollout1, **token)
    out.loss.backward()
    assert old1.grad is None and rollout1.grad is None
    plain = grpo_loss(lp2, old, adv, mask, loss_type=opts["loss_type"])
    plain.loss.backward()
    w, _ = rollout_weight(torch.where(mask, old, 0), torch.where(mask, rollout, 0), mask, opts["rollout_correction"],
                          opts["rollout_ratio_min"], opts["rollout_ratio_max"])
    torch.testing.assert_close(lp1.grad, w * lp2.grad, rtol=1e-12, atol=1e-15)
    # Â = 0: no policy gradient, so what is left (KL, entropy) is the same with and without w
    zero = torch.zeros_like(adv)
    grads = []
    for kw in (dict(), dict(rollout_logprobs=rollout, **opts)):
        x, e = lp.clone().requires_grad_(), ent.clone().requires_grad_()
        o = grpo_loss(x, old, zero, mask, ref_logprobs=ref, entropy=e, beta=0.1, alpha=0.05,
                      **{"loss_type": opts["loss_type"], "ratio_level": opts["ratio_level"], **kw})
        grads.append((o.loss, o.kl, o.entropy, *torch.autograd.grad(o.loss, (x, e))))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@settings_
@given(batches(), rollout_options, st.data())
def test_nan_rollout_tokens_get_weight_one(batch, opts, data):
    """For w, a NaN rollout log-prob counts as log π_rollout = log π_old: the same loss and
    gradient as putting π_old there, in every mode; in token modes whose bounds contain 1 its w
    is exactly 1.  (The off-policy mask counts it as a zero gap instead: the eq. 9 test.)"""
    lp, old, adv, mask = batch
    rollout = data.draw(rollouts(old))
    filled = torch.where(torch.isnan(rollout), old, rollout)
    results = []
    for r in (rollout, filled):
        x = lp.clone().requires_grad_()
        o = grpo_loss(x, old, adv, mask, rollout_logprobs=r, **opts)
        results.append((o.loss, torch.autograd.grad(o.loss, x)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    w, _ = rollout_weight(torch.where(mask, old, 0), torch.where(mask, rollout, 0), mask, "token_truncate",
                          opts["rollout_ratio_min"], opts["rollout_ratio_max"])
    assert (w[torch.isnan(rollout) & mask] == 1).all()


@settings_
@given(batches(), st.floats(-1, 1), st.booleans(), st.data())
def test_off_policy_mask_drops_exactly_what_eq9_says(batch, delta, with_rollout, data):
    """keep_i ⟺ Â_i ≥ 0 or mean gap ≤ δ (by loops); never drops Â ≥ 0; and a dropped
    completion is one whose advantage was 0: the same loss and gradient as zeroing its Â."""
    lp, old, adv, mask = batch
    rollout = data.draw(rollouts(old)) if with_rollout else None
    sampled = old if rollout is None else rollout
    gaps = mean_gaps(sampled, lp, mask)
    keep = off_policy_mask(torch.where(mask, lp, 0), torch.where(mask, sampled, 0), adv, mask, delta)
    assert keep.tolist() == [adv[i].item() >= 0 or gaps[i] <= delta for i in range(len(adv))]
    assert keep[adv >= 0].all()
    x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    masked = grpo_loss(x1, old, adv, mask, rollout_logprobs=rollout, off_policy_mask_threshold=delta)
    zeroed = grpo_loss(x2, old, torch.where(keep, adv, 0.0), mask)
    assert torch.equal(masked.loss, zeroed.loss)
    assert torch.equal(torch.autograd.grad(masked.loss, x1)[0], torch.autograd.grad(zeroed.loss, x2)[0])
    assert masked.metrics["off_policy_masked_frac"] == pytest.approx((~keep).double().mean().item())


@pytest.mark.parametrize("fill", FILLS)
def test_rollout_padding_never_matters(fill):
    lp, old, adv, mask, _, _, rollout = rollout_batch()
    kw = dict(rollout_correction="sequence_truncate", rollout_ratio_min=0.5, off_policy_mask_threshold=DELTA)
    clean = grpo_loss(lp, old, adv, mask, rollout_logprobs=rollout, **kw)
    value = 100 * torch.randn(rollout.shape, dtype=F64) if fill == "random" else torch.full_like(rollout, fill)
    dirty = grpo_loss(lp, old, adv, mask, rollout_logprobs=torch.where(mask, rollout, value), **kw)
    assert torch.equal(clean.loss, dirty.loss) and clean.metrics == dirty.metrics


BAD_ROLLOUT = [
    (dict(rollout_correction="token_clip"), "rollout_correction"),
    (dict(rollout_correction="token_truncate", rollout_logprobs=None), "rollout_logprobs"),
    (dict(rollout_logprobs=torch.zeros(2, 4, dtype=F64)), "rollout_logprobs"),
    (dict(rollout_logprobs=torch.zeros(2, 3, dtype=torch.long)), "rollout_logprobs"),
    (dict(rollout_logprobs=torch.tensor([[0.0, -math.inf, 0.0], [0.0, 0.0, 0.0]], dtype=F64)), "rollout_logprobs"),
    (dict(rollout_logprobs=torch.tensor([[math.inf, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)), "rollout_logprobs"),
    (dict(rollout_ratio_min=0.0), "rollout_ratio_min"),
    (dict(rollout_ratio_min=-1.0), "rollout_ratio_min"),
    (dict(rollout_ratio_min=math.nan), "rollout_ratio_min"),
    (dict(rollout_ratio_max=math.inf), "rollout_ratio_max"),
    (dict(rollout_ratio_max=True), "rollout_ratio_max"),
    (dict(rollout_ratio_max="3"), "rollout_ratio_max"),
    (dict(rollout_ratio_min=2.0, rollout_ratio_max=1.0), "rollout_ratio_min"),
    (dict(off_policy_mask_threshold=math.inf), "off_policy_mask_threshold"),
    (dict(off_policy_mask_threshold=math.nan), "off_policy_mask_threshold"),
    (dict(off_policy_mask_threshold=False), "off_policy_mask_threshold"),
]


@pytest.mark.parametrize("change, match", BAD_ROLLOUT)
def test_rollout_bad_inputs(change, match):
    b = _batch()  # mask: rows of 3 and 2 tokens; the padded (1, 2) may hold anything, even inf
    kwargs = {"rollout_logprobs": b["old_logprobs"].clone(), "rollout_correction": "token_mask", **change}
    with pytest.raises(ValueError, match=match):
        grpo_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], **kwargs)


def test_rollout_good_edge_inputs():
    """None bounds, C_min = C_max, a negative δ, ±inf on padding, batches with no completion
    token (T = 0 too): all accepted, finite."""
    b = _batch()
    rollout = b["old_logprobs"].clone()
    rollout[1, 2] = math.inf
    assert not b["mask"][1, 2]
    for kw in (dict(rollout_ratio_min=None, rollout_ratio_max=None), dict(rollout_ratio_min=1.0, rollout_ratio_max=1.0),
               dict(off_policy_mask_threshold=-0.5)):
        out = grpo_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], rollout_logprobs=rollout,
                        rollout_correction="sequence_truncate", **kw)
        assert torch.isfinite(out.loss)
    for mode, mask in itertools.product(CORRECTIONS, (torch.zeros(2, 3), torch.zeros(2, 0))):  # no completion token
        x = torch.zeros(mask.shape, dtype=F64, requires_grad=True)
        out = grpo_loss(x, x.detach(), b["advantages"], mask, rollout_logprobs=x.detach(), rollout_correction=mode,
                        off_policy_mask_threshold=0.5)
        out.loss.backward()
        assert out.loss.item() == 0.0 and torch.isfinite(x.grad).all()
        assert all(math.isfinite(out.metrics[k]) for k in ROLLOUT_METRICS)
