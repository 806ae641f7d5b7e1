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
    LossOutput,
    aggregate,
    aggregation_normalizer,
    clipped_surrogate,
    grpo_loss,
    importance_ratio,
    kl_penalty,
)

LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]
RATIO_LEVELS = ["token", "sequence"]
ESTIMATORS = ["k1", "k2", "k3"]
F64 = torch.float64


# --------------------------------------------------------------------------- transcription


def transcribed_loss(lp, old, adv, mask, ref, ent, *, beta, alpha, eps_low, eps_high, loss_type,
                     ratio_level, estimator, max_len=None, surrogate="clip", kl_bias_correction=False):  # fmt: skip
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

    def kl(i, t):
        d = ref[i, t] - lp[i, t]
        k = {"k1": -d, "k2": d**2 / 2, "k3": torch.exp(d) - d - 1}[estimator]
        return rho(i, t) * k if kl_bias_correction else k

    loss = agg(pg)
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
    assert (grad[zero_expected & ~near_edge] == 0).all()
    assert (grad[~zero_expected & ~near_edge] != 0).all()


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
                                     dict(kl_bias_correction=True, kl_estimator="k2")], ids=str)
def test_pieces_with_the_whole_normalizer_add_up_to_the_whole_loss(loss_type, variant):
    """Split into pieces (micro-batches, ranks), each ``grpo_loss`` divided by the whole batch's
    ``aggregation_normalizer`` (the sum of the pieces'): the losses and the gradients add up to
    the whole batch's, for every term (policy, KL and entropy), while each piece's own
    normaliser does not give the same (the bug this guards against)."""
    g = torch.Generator().manual_seed(7)
    n, t = 6, 5
    old = -torch.rand(n, t, generator=g, dtype=F64)
    lp0 = old + 0.3 * torch.randn(n, t, generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(n, t, generator=g, dtype=F64)
    ent0 = torch.rand(n, t, generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64)
    mask = torch.arange(t) < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]
    kw = dict(beta=0.1, alpha=0.01, loss_type=loss_type, max_len=8, **variant)

    def run(pieces, normalizer):
        lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
        total = sum(grpo_loss(lp[r], old[r], adv[r], mask[r], ref_logprobs=ref[r], entropy=ent[r],
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
