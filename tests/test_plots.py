"""Smoke test of minigrpo.plots: every figure draws from small inputs without error."""

import matplotlib

matplotlib.use("Agg")  # headless; set here, never in a notebook (it drops figures from the HTML)

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from minigrpo import plots  # noqa: E402
from minigrpo.metrics import METRICS  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_plot_clipped_surrogate():
    fig = plots.plot_clipped_surrogate(eps_low=0.2, eps_high=0.28)
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_plot_advantages_accepts_tensors():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    advantages = {"group": torch.randn(6), "none": torch.randn(6).numpy()}
    fig = plots.plot_advantages(rewards, advantages, group_size=3)
    assert len(fig.axes) == 2


def test_plot_token_weights():
    fig = plots.plot_token_weights([3, 10, 5], {"grpo": [0.1, 0.03, 0.06], "dapo": [0.05] * 3})
    assert fig.axes[0].get_yscale() == "log"


def test_plot_history_and_runs():
    history = [{"step": s, "reward_mean": s / 10, "kl": 0.01 * s} for s in range(5)]
    history[2].pop("kl")  # a missing value leaves a gap, not an error
    fig = plots.plot_history(history, ["reward_mean", "kl", "entropy"])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    assert visible[0].get_ylabel() == METRICS["reward_mean"]
    fig = plots.plot_runs({"a": history, "b": history[:3]}, ["reward_mean"])
    assert fig.axes[0].get_legend() is not None


def test_plot_runs_needs_keys():
    with pytest.raises(ValueError, match="keys"):
        plots.plot_runs({"a": []}, [])


def test_plot_seed_band_draws_the_mean_and_the_range():
    fig, ax = plt.subplots()
    plots.plot_seed_band(ax, [0, 10, 20], [[0.1, 0.5, 0.7], [0.3, 0.5, 0.9]], "GRPO", "C0", marker="o")
    line, = ax.get_lines()
    assert line.get_label() == "GRPO" and list(line.get_ydata()) == pytest.approx([0.2, 0.5, 0.8])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.1) and band.max() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="per_seed"):
        plots.plot_seed_band(ax, [0, 10], [[0.1, 0.5, 0.7]], "GRPO", "C0")
