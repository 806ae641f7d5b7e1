"""minigrpo.advantages: Â_i = (r_i − b_i) / (std_j r_j + δ), b_i the group mean or the leave-one-out mean."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigrpo.advantages import group_advantages

SCALES = ["group", "batch", "none"]


def transcription(rewards, group_size, scale, eps, baseline="mean"):
    """The formula with Python loops and the math module, float64."""
    r = [float(x) for x in rewards]
    n = len(r)
    batch_mean = sum(r) / n
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in r) / (n - 1)) if n > 1 else 0.0
    out = []
    for start in range(0, n, group_size):
        group = r[start : start + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (group_size - 1)) if group_size > 1 else 0.0
        for i, x in enumerate(group):
            others = group[:i] + group[i + 1 :]
            b = mean if baseline == "mean" else sum(others) / len(others)
            if all(y == group[0] for y in group):
                out.append(0.0)
            elif scale == "group":
                out.append((x - b) / (std + eps))
            elif scale == "batch":
                out.append((x - b) / (batch_std + eps))
            else:
                out.append(x - b)
    return torch.tensor(out, dtype=torch.float64)


def test_golden():
    """Group (1, 0): mean 0.5, Bessel std √0.5 = 0.7071 → ±0.5/0.7071 = ±0.7071."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.7071068, -0.7071068, 0, 0, 0, 0]))
    assert (adv[2:] == 0).all()
    # the same rewards, groups of 3: (1, 0, 0) and (0, 1, 1); means 1/3 and 2/3, std 0.57735
    adv = group_advantages(rewards, group_size=3, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.1547, -0.57735, -0.57735, -1.1547, 0.57735, 0.57735]))
    # "none" only centres; "batch" divides by the std of all six rewards (0.5477)
    torch.testing.assert_close(group_advantages(rewards, 3, "none"), torch.tensor([2, -1, -1, -2, 1, 1]) / 3)
    torch.testing.assert_close(group_advantages(rewards, 3, "batch", 0.0), torch.tensor([2, -1, -1, -2, 1, 1]) / 3 / 0.5477226)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.5])
def test_matches_transcription(scale, group_size, eps):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(16, generator=g, dtype=torch.float64)
    rewards[:group_size] = 0.25  # one zero-variance group
    want = transcription(rewards, group_size, scale, eps)
    torch.testing.assert_close(group_advantages(rewards, group_size, scale, eps), want, rtol=1e-12, atol=1e-12)


def test_binary_rewards_float32_default_eps():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), transcription(rewards, 4, "group", 1e-4))


@st.composite
def grouped_rewards(draw, min_group=2):
    group_size = draw(st.integers(min_group, 6))
    groups = draw(st.integers(1, 4))
    values = draw(st.lists(st.floats(-100, 100), min_size=group_size * groups, max_size=group_size * groups))
    return torch.tensor(values, dtype=torch.float64), group_size


@settings(max_examples=50, deadline=None)
@given(grouped_rewards(), st.floats(-50, 50), st.sampled_from([0.0, 1e-4, 0.1]))
def test_group_shift_invariance(data, shift, eps):
    rewards, group_size = data
    # shift a whole group by the same amount: its advantages do not change (whatever ε)
    shifted = rewards.clone()
    shifted[:group_size] += shift
    a, b = group_advantages(rewards, group_size, eps=eps), group_advantages(shifted, group_size, eps=eps)
    spread = (rewards[:group_size].max() - rewards[:group_size].min()).item()
    if spread > 1e-6:  # (a rounding-level spread can become exactly flat after the shift)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * (1 + abs(shift) / spread))


@settings(max_examples=50, deadline=None)
@given(grouped_rewards(), st.floats(1e-2, 1e2))
def test_group_scale_invariance_with_eps_zero(data, scale):
    """With ε = 0, multiplying a group's rewards by c > 0 leaves its advantages unchanged.
    (ε > 0 breaks this exactly: (c·x − c·m)/(c·s + ε) ≠ (x − m)/(s + ε).)"""
    rewards, group_size = data
    scaled = rewards.clone()
    scaled[:group_size] *= scale
    torch.testing.assert_close(
        group_advantages(rewards, group_size, eps=0.0), group_advantages(scaled, group_size, eps=0.0), rtol=1e-9, atol=1e-9
    )


@settings(max_examples=50, deadline=None)
@given(grouped_rewards(min_group=1), st.sampled_from(SCALES), st.sampled_from([0.0, 1e-4]))
def test_advantages_sum_to_zero_per_group(data, scale, eps):
    rewards, group_size = data
    adv = group_advantages(rewards, group_size, scale, eps).view(-1, group_size)
    bound = 1e-9 * (1 + group_size * adv.abs().max().item())
    assert (adv.sum(dim=1).abs() <= bound).all()
    assert torch.isfinite(adv).all()


@settings(max_examples=50, deadline=None)
@given(st.floats(-1e6, 1e6), st.integers(1, 8), st.integers(1, 3), st.sampled_from(SCALES), st.sampled_from([0.0, 1e-4]))
def test_zero_variance_groups_are_exactly_zero(value, group_size, groups, scale, eps):
    flat = torch.full((group_size,), value)
    others = torch.arange(group_size * groups, dtype=torch.float32)
    for rewards in (torch.cat([flat, others]), flat.repeat(groups)):
        adv = group_advantages(rewards, group_size, scale, eps)
        assert (adv[:group_size] == 0).all() and torch.isfinite(adv).all()


def test_group_size_one_gives_zeros():
    for scale in SCALES:
        assert (group_advantages(torch.tensor([0.0, 1.0, 5.0]), 1, scale) == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rewards": torch.ones(2, 2), "group_size": 2}, "rewards"),
        ({"rewards": [1.0, 0.0], "group_size": 2}, "rewards"),
        ({"rewards": torch.tensor([1, 0]), "group_size": 2}, "rewards"),
        ({"rewards": torch.tensor([1.0, float("nan")]), "group_size": 2}, "rewards"),
        ({"rewards": torch.tensor([1.0, float("inf")]), "group_size": 2}, "rewards"),
        ({"rewards": torch.ones(4), "group_size": 0}, "group_size"),
        ({"rewards": torch.ones(4), "group_size": 3}, "group_size"),
        ({"rewards": torch.ones(4), "group_size": 2.0}, "group_size"),
        ({"rewards": torch.ones(4), "group_size": True}, "group_size"),
        ({"rewards": torch.ones(4), "group_size": 2, "scale": "std"}, "scale"),
        ({"rewards": torch.ones(4), "group_size": 2, "eps": -1e-4}, "eps"),
        ({"rewards": torch.ones(4), "group_size": 2, "eps": float("nan")}, "eps"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)


@pytest.mark.parametrize("spread", [1e-263, 1e-170, 1e160])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_tiny_and_huge_spreads_give_finite_unit_advantages(spread, scale):
    """A group whose std under- or overflows in float64 (found by hypothesis: rewards 0 and
    1.3e-263) still gets Â = ±1/√2, not inf or nan."""
    rewards = torch.tensor([0.0, spread], dtype=torch.float64)
    adv = group_advantages(rewards, 2, scale, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_leave_one_out_matches_transcription(scale, group_size):
    """b_i = mean of the other G − 1 rewards, by loops; and it is (G/(G−1)) × GRPO's advantage."""
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(24, generator=g, dtype=torch.float64)
    rewards[:group_size] = 1.0  # one zero-variance group: still exactly 0
    loo = group_advantages(rewards, group_size, scale, 1e-4, baseline="leave_one_out")
    torch.testing.assert_close(loo, transcription(rewards, group_size, scale, 1e-4, "leave_one_out"),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loo, group_advantages(rewards, group_size, scale, 1e-4) * group_size / (group_size - 1),
                               rtol=1e-12, atol=1e-12)
    assert (loo[:group_size] == 0).all()


def test_leave_one_out_needs_two_per_group_and_a_known_baseline():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([1.0, 0.0]), 1, baseline="leave_one_out")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(torch.tensor([1.0, 0.0]), 2, baseline="median")
