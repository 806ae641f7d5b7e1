"""The sequence world against enumeration, in float64: probabilities, the score identity, the KL
estimators' expected gradients (the reward's penalty is exact, per-token losses only for one
token), the per-token ratio's bias, GRPO's expected gradient against grpo_loss over every group,
and the KL-regularised optimum."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minigrpo as mg
from minigrpo import seqworld as sw

EXACT = {"rtol": 1e-10, "atol": 1e-12}


def leaf(world, seed, scale=1.0):
    return sw.random_logits(world, scale, seed).requires_grad_(True)


def rewards_of(world, seed):
    return torch.rand(world.num_completions, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_world_enumerates_every_completion():
    world = sw.sequence_world(3, 3, eos=0)
    assert world.num_completions == 1 + 2 + 3 * 4 and world.num_prefixes == 1 + 2 + 4
    seen = set()
    for tokens, mask in zip(world.tokens.tolist(), world.mask.tolist()):
        o = tuple(t for t, m in zip(tokens, mask) if m)
        assert 1 <= len(o) <= 3 and 0 not in o[:-1]  # EOS only at the end
        assert o[-1] == 0 or len(o) == 3  # stopped by EOS or by the horizon
        seen.add(o)
    assert len(seen) == world.num_completions
    assert world.prefixes[0] == () and world.lengths.tolist()[:3] == [1, 2, 2]


@settings(max_examples=15, deadline=None)
@given(v=st.integers(2, 4), h=st.integers(1, 4), eos=st.integers(0, 3), seed=st.integers(0, 10**6))
def test_probabilities_sum_to_one(v, h, eos, seed):
    world = sw.sequence_world(v, h, eos=eos % v)
    expected_m = sum((v - 1) ** (n - 1) for n in range(1, h)) + v * (v - 1) ** (h - 1)
    assert world.num_completions == expected_m
    p = sw.probabilities(world, sw.random_logits(world, 2.0, seed))
    assert abs(p.sum().item() - 1) < 1e-12 and bool((p > 0).all())


def test_sequence_logprob_is_the_sum_of_token_logprobs():
    world = sw.sequence_world(3, 4)
    logits = sw.random_logits(world, seed=3)
    row = {p: i for i, p in enumerate(world.prefixes)}
    by_hand = []
    for tokens, mask in zip(world.tokens.tolist(), world.mask.tolist()):
        o = [t for t, m in zip(tokens, mask) if m]
        by_hand.append(sum(math.log(logits[row[tuple(o[:t])]].softmax(0)[o[t]]) for t in range(len(o))))
    torch.testing.assert_close(sw.sequence_logprobs(world, logits), torch.tensor(by_hand, dtype=torch.float64), **EXACT)
    torch.testing.assert_close(sw.sequence_logprobs(world, logits), sw.token_logprobs(world, logits).sum(1))


def test_score_gradients_are_autograd_of_each_completion():
    world = sw.sequence_world(3, 3)
    theta = leaf(world, 0)
    c = torch.randn(world.tokens.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    per_sample = sw.score_gradients(world, theta, c)  # (M, P, V)
    lp = sw.token_logprobs(world, theta)
    for i in range(world.num_completions):
        (by_autograd,) = torch.autograd.grad((c[i] * lp[i]).sum(), theta, retain_graph=True)
        torch.testing.assert_close(per_sample[i], by_autograd, **EXACT)


def test_score_identity_and_gradcheck():
    world = sw.sequence_world(3, 3)
    theta, r = leaf(world, 0), rewards_of(world, 0)
    exact = sw.gradient(sw.expected_reward(world, theta, r), theta)
    reinforce = r[:, None].expand_as(world.mask)  # c_t = r(o): r(o)·∇log π(o)
    mean = sw.gradient_moments(sw.score_gradients(world, theta, reinforce), sw.probabilities(world, theta)).mean
    torch.testing.assert_close(mean, exact, **EXACT)
    world = sw.sequence_world(3, 2)  # gradcheck perturbs every logit: the smaller world
    theta, r = leaf(world, 0), rewards_of(world, 0)
    ref = sw.random_logits(world, seed=1)
    assert torch.autograd.gradcheck(lambda t: sw.expected_reward(world, t, r), (theta,))
    assert torch.autograd.gradcheck(lambda t: sw.sequence_kl(world, t, ref), (theta,))
    assert torch.autograd.gradcheck(lambda t: sw.regularised_objective(world, t, ref, r, 0.3), (theta,))


@pytest.mark.parametrize("h", [1, 2, 3])
def test_reward_side_kl_is_exactly_the_sequence_kl_gradient(h):
    world = sw.sequence_world(3, h)
    theta, ref, old = leaf(world, 0), sw.random_logits(world, seed=1), sw.random_logits(world, seed=2)
    target = sw.gradient(sw.sequence_kl(world, theta, ref), theta)
    for sampler in (None, old):  # on-policy, and off-policy with the sequence weight
        moments = sw.estimator_moments(world, theta, sw.kl_coefficients(world, theta, ref, sampler), sampler)
        for name in ("k1 in the reward", "k1 in the reward, to go"):
            torch.testing.assert_close(moments[name].mean, target, **EXACT)
    on = sw.estimator_moments(world, theta, sw.kl_coefficients(world, theta, ref))
    torch.testing.assert_close(on["k1 loss"].mean, torch.zeros_like(target), **EXACT)
    assert on["k1 in the reward, to go"].variance <= on["k1 in the reward"].variance + 1e-12


@pytest.mark.parametrize("h", [1, 2, 3])
def test_per_token_kl_losses_are_exact_for_one_token_only(h):
    world = sw.sequence_world(3, h)
    theta, ref, old = leaf(world, 0), sw.random_logits(world, seed=1), sw.random_logits(world, seed=2)
    reverse = sw.gradient(sw.sequence_kl(world, theta, ref), theta)  # ∇KL(π_θ ‖ π_ref)
    forward = sw.gradient(sw.sequence_kl(world, ref, theta), theta)  # ∇KL(π_ref ‖ π_θ)
    on = sw.estimator_moments(world, theta, sw.kl_coefficients(world, theta, ref))
    off = sw.estimator_moments(world, theta, sw.kl_coefficients(world, theta, ref, old), old)
    torch.testing.assert_close(on["k2 loss"].mean, on["rho*k3 loss"].mean, **EXACT)  # same per sample
    cases = [(on["k2 loss"], reverse), (on["rho*k3 loss"], reverse), (on["k3 loss"], forward),
             (off["rho*k3 loss"], reverse)]
    for moments, target in cases:
        bias = sw.relative_bias(moments.mean, target)
        assert (bias < 1e-12) if h == 1 else (bias > 0.05), (h, bias)


@pytest.mark.parametrize("h", [1, 2, 3])
def test_token_ratio_is_importance_sampling_for_one_token_only(h):
    world = sw.sequence_world(3, h)
    theta, old, r = leaf(world, 0), sw.random_logits(world, seed=2), rewards_of(world, 0)
    target = sw.gradient(sw.expected_reward(world, theta, r), theta)
    adv = r - sw.probabilities(world, old) @ r  # any constant baseline leaves ∇J unchanged
    on = sw.estimator_moments(world, theta, sw.policy_gradient_coefficients(world, theta, adv))
    off = sw.estimator_moments(world, theta, sw.policy_gradient_coefficients(world, theta, adv, old), old)
    for name in sw.PG_ESTIMATORS:
        torch.testing.assert_close(on[name].mean, target, **EXACT)
    torch.testing.assert_close(off["sequence ratio"].mean, target, **EXACT)
    token_bias = sw.relative_bias(off["token ratio"].mean, target)
    assert (token_bias < 1e-12) if h == 1 else (token_bias > 0.05)
    assert sw.relative_bias(off["no ratio"].mean, target) > 0.05


def _grpo_by_enumeration(world, theta, r, g, loss_type, scale):
    """Σ over all M^G groups of Pr(group) · (−∇ grpo_loss), through the package's loss."""
    lp = sw.token_logprobs(world, theta)  # (M, H)
    total = torch.zeros_like(theta)
    p = sw.probabilities(world, theta).detach()
    for group in itertools.product(range(world.num_completions), repeat=g):
        idx = torch.tensor(group)
        adv = mg.group_advantages(r[idx], g, scale=scale)
        out = mg.grpo_loss(lp[idx], lp[idx].detach(), adv, world.mask[idx], loss_type=loss_type,
                           max_len=world.horizon)
        total -= p[idx].prod() * torch.autograd.grad(out.loss, theta, retain_graph=True)[0]
    return total


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_grpo_expected_gradient_against_grpo_loss_over_every_group(loss_type, scale):
    world = sw.sequence_world(3, 2)  # M = 7: 49 groups of two
    theta = leaf(world, 4)
    r = torch.round(rewards_of(world, 5) * 2) / 2  # ties, so that classes repeat
    exact = sw.grpo_expected_gradient(world, theta, r, 2, loss_type=loss_type, scale=scale)
    torch.testing.assert_close(exact, _grpo_by_enumeration(world, theta, r, 2, loss_type, scale), **EXACT)


def test_grpo_expected_gradient_is_a_multiple_of_grad_j_only_without_its_weights():
    world = sw.sequence_world(3, 3)
    theta = leaf(world, 0)
    r = torch.arange(world.num_completions, dtype=torch.float64) % 3  # rewards 0, 1, 2
    g, h = 4, world.horizon
    grad_j = sw.gradient(sw.expected_reward(world, theta, r), theta)
    dr = sw.grpo_expected_gradient(world, theta, r, g, loss_type="dr_grpo", scale="none")
    torch.testing.assert_close(dr, (g - 1) / (g * h) * grad_j, **EXACT)
    loo = sw.grpo_expected_gradient(world, theta, r, g, loss_type="dr_grpo", scale="none", baseline="leave_one_out")
    torch.testing.assert_close(loo, grad_j / h, **EXACT)

    def off_the_line(e, target=grad_j):  # ‖e − c·target‖ / ‖e‖ at the best c
        c = (e * target).sum() / target.square().sum()
        return float((e - c * target).norm() / e.norm())

    assert off_the_line(sw.grpo_expected_gradient(world, theta, r, g)) > 0.05  # grpo, group std
    assert off_the_line(sw.grpo_expected_gradient(world, theta, r, g, scale="none")) > 0.05  # 1/|o|
    assert off_the_line(sw.grpo_expected_gradient(world, theta, r, g, loss_type="dr_grpo")) > 0.01  # 1/std
    binary = (r > 0).double()  # one prompt, two reward values: 1/std only rescales
    grad_binary = sw.gradient(sw.expected_reward(world, theta, binary), theta)
    assert off_the_line(sw.grpo_expected_gradient(world, theta, binary, g, loss_type="dr_grpo"), grad_binary) < 1e-12


def test_grpo_expected_gradient_large_group_is_cheap_and_finite():
    world = sw.sequence_world(10, 1)  # one token, ten answers
    theta, r = leaf(world, 0), (torch.arange(10) == 0).double()
    e = sw.grpo_expected_gradient(world, theta, r, 16)
    assert torch.isfinite(e).all() and e[0, 0] > 0  # pushes the right answer up


def test_kl_regularised_optimum():
    world = sw.sequence_world(3, 3)
    ref, r, beta = sw.random_logits(world, seed=1), rewards_of(world, 2), 0.3
    opt = sw.kl_regularised_optimum(world, ref, r, beta)
    torch.testing.assert_close(sw.probabilities(world, opt.logits), opt.probs, **EXACT)
    theta = opt.logits.clone().requires_grad_(True)
    value = sw.regularised_objective(world, theta, ref, r, beta)
    assert abs(value.item() - opt.objective) < 1e-12
    assert abs(opt.expected_reward - beta * opt.kl - opt.objective) < 1e-12
    torch.testing.assert_close(sw.gradient(value, theta), torch.zeros_like(theta), rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # any perturbation lowers it
        moved = opt.logits + 0.1 * torch.randn(opt.logits.shape, generator=gen, dtype=torch.float64)
        assert sw.regularised_objective(world, moved, ref, r, beta).item() < opt.objective


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), beta=st.floats(0.05, 5.0))
def test_optimum_beats_every_random_policy(seed, beta):
    world = sw.sequence_world(3, 2)
    ref, r = sw.random_logits(world, seed=seed), rewards_of(world, seed + 1)
    opt = sw.kl_regularised_optimum(world, ref, r, beta)
    other = sw.random_logits(world, 2.0, seed + 2)
    assert sw.regularised_objective(world, other, ref, r, beta).item() <= opt.objective + 1e-12
    assert sw.sequence_kl(world, other, ref).item() >= 0


def test_invalid_arguments():
    world = sw.sequence_world(3, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        sw.sequence_world(1, 2)
    with pytest.raises(ValueError, match="eos"):
        sw.sequence_world(3, 2, eos=3)
    with pytest.raises(ValueError, match="logits"):
        sw.token_logprobs(world, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="rewards"):
        sw.expected_reward(world, sw.random_logits(world), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale"):
        sw.grpo_expected_gradient(world, sw.random_logits(world), rewards_of(world, 0), 2, scale="batch")
    with pytest.raises(ValueError, match="beta"):
        sw.kl_regularised_optimum(world, sw.random_logits(world), rewards_of(world, 0), 0.0)
