"""The matplotlib figures the book's chapters share.

Each function draws one figure from numbers it is given (tensors, arrays or lists) and returns
the :class:`matplotlib.figure.Figure`; a notebook then calls ``plt.show()``.  The numbers a
figure shows are computed by the chapter (usually with the package's own functions) and only
drawn here; training curves take their axis labels from the trainer's one list of metrics
(``minigrpo.metrics.METRICS``).

    import matplotlib.pyplot as plt
    from minigrpo import plots

    fig = plots.plot_history(history, ["reward_mean", "kl_token_mean", "entropy_token_mean"])
    plt.show()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from minigrpo.metrics import metric_label

def _numpy(x) -> np.ndarray:
    """A float numpy array from a tensor, array or list."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def plot_clipped_surrogate(eps_low: float = 0.2, eps_high: float | None = None) -> Figure:
    """Draw the clipped surrogate ``min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â)`` against the ratio ρ.

    One panel for a positive advantage (Â = +1) and one for a negative one (Â = −1).  The shaded
    band is where the surrogate is flat in ρ, so the token gets no gradient: ρ > 1 + ε_high for
    Â > 0, and ρ < 1 − ε_low for Â < 0.  The policy-gradient loss is minus this surrogate.

    Args:
        eps_low: clip range below 1 (symbol ε_low, typically 0.2).
        eps_high: clip range above 1 (symbol ε_high); ``None`` means ``eps_low``.

    Returns:
        The figure, two axes side by side.
    """
    eps_high = eps_low if eps_high is None else eps_high
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    ratio = np.linspace(0.0, 2.0, 401)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, adv in zip(axes, (1.0, -1.0)):
        unclipped = ratio * adv
        surrogate = np.minimum(unclipped, np.clip(ratio, lo, hi) * adv)
        flat = (ratio > hi) if adv > 0 else (ratio < lo)
        ax.axvspan(hi if adv > 0 else 0.0, 2.0 if adv > 0 else lo, color="0.9",
                   label="no gradient (clipped)")
        ax.plot(ratio, unclipped, ":", color="0.5", label=r"$\rho\,\hat{A}$ (unclipped)")
        ax.plot(ratio, surrogate, color="C0" if adv > 0 else "C3", lw=2,
                label=r"$\min(\rho\hat{A},\ \mathrm{clip}(\rho)\hat{A})$")
        ax.plot(ratio[flat], surrogate[flat], color="k", lw=2)
        for x in (lo, 1.0, hi):
            ax.axvline(x, color="0.7", lw=0.8)
        ax.set_title(rf"$\hat{{A}} = {adv:+.0f}$, clip range [{lo:.2f}, {hi:.2f}]")
        ax.set_xlabel(r"ratio $\rho = \pi_\theta / \pi_{\theta_{old}}$")
        ax.set_ylabel("surrogate objective (to maximise)")
        ax.legend(loc="upper left" if adv > 0 else "lower left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_advantages(rewards, advantages: Mapping[str, object], group_size: int) -> Figure:
    """Bar chart of rewards and of the advantages each normalisation gives them.

    Args:
        rewards: ``[N]`` rewards r_i, consecutive blocks of ``group_size`` are one group.
        advantages: name -> ``[N]`` advantages Â_i (e.g. ``{"group": ..., "none": ...}``).
        group_size: G, the completions per question; groups are separated by vertical lines.

    Returns:
        The figure, rewards on top and advantages below, with one bar colour per entry of ``advantages``.
    """
    r = _numpy(rewards)
    n = len(r)
    x = np.arange(n)
    fig, (ax_r, ax_a) = plt.subplots(2, 1, figsize=(10, 5), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 2]})
    ax_r.bar(x, r, color="0.5")
    ax_r.set_ylabel(r"reward $r_i$")
    width = 0.8 / max(len(advantages), 1)
    for k, (name, adv) in enumerate(advantages.items()):
        ax_a.bar(x - 0.4 + width * (k + 0.5), _numpy(adv), width, label=name)
    ax_a.axhline(0.0, color="k", lw=0.8)
    ax_a.set_ylabel(r"advantage $\hat{A}_i$")
    ax_a.set_xlabel("completion $i$ (groups of $G$ = %d)" % group_size)
    ax_a.legend(title="scale", fontsize=8)
    for ax in (ax_r, ax_a):
        for b in range(group_size, n, group_size):
            ax.axvline(b - 0.5, color="0.6", lw=0.8, ls="--")
    ax_a.set_xticks(x)
    fig.tight_layout()
    return fig


def plot_token_weights(lengths, weights: Mapping[str, object]) -> Figure:
    """Per-token weight in the aggregated loss against completion length, one line per loss type.

    Args:
        lengths: ``[N]`` completion lengths ``|o_i|`` (tokens).
        weights: loss type -> ``[N]`` weight that one token of completion i gets in the loss,
            i.e. d loss / d x_{i,t} for a per-token term x.

    Returns:
        The figure, one axes with log-scaled y.
    """
    lengths = _numpy(lengths)
    order = np.argsort(lengths)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, w in weights.items():
        ax.plot(lengths[order], _numpy(w)[order], "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel(r"completion length $|o_i|$ (tokens)")
    ax.set_ylabel("weight of one token in the loss")
    ax.legend(title="loss_type", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str],
              ncols: int = 2) -> Figure:
    """Training curves of several runs, one panel per metric, one line per run.

    Args:
        runs: run name -> history, a list of per-step dicts (e.g.
            ``{"step": 3, "reward_mean": 0.4, "kl": 0.01}``).  The x axis is ``"step"`` when the
            dicts have it, else the list index; a step without a key leaves a gap.
        keys: the metrics to draw, one panel each (labels from ``minigrpo.metrics.METRICS``).
        ncols: panels per row.

    Returns:
        The figure.
    """
    if not keys:
        raise ValueError("keys must name at least one metric")
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, min(ncols, len(keys)), figsize=(5 * min(ncols, len(keys)),
                             3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, history in runs.items():
            steps = [row.get("step", i) for i, row in enumerate(history)]
            values = [row.get(key, np.nan) for row in history]
            ax.plot(steps, _numpy(values), label=name or None)
        ax.set_xlabel("step")
        ax.set_ylabel(metric_label(key))
        ax.grid(alpha=0.3)
        if any(runs):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_seed_band(ax, steps: Sequence[float], per_seed: Sequence[Sequence[float]], label: str, color: str,
                   **line) -> None:
    """One curve over several seeds, on ``ax``: the mean over seeds as a line (``line`` goes to
    ``ax.plot``: marker, ls, …) and the seeds' minimum to maximum as a shaded band.
    ``per_seed`` holds one sequence of values per seed, each as long as ``steps``."""
    values = _numpy(per_seed)  # (seeds, steps)
    if values.ndim != 2 or values.shape[1] != len(steps):
        raise ValueError(f"per_seed must be (seeds, {len(steps)}) values, got shape {values.shape}")
    ax.plot(steps, values.mean(0), color=color, label=label, **line)
    ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15, lw=0)


def plot_history(history: Sequence[Mapping[str, float]], keys: Sequence[str],
                 ncols: int = 2) -> Figure:
    """Training curves of one run: one panel per metric in ``keys``.

    Args:
        history: a list of per-step dicts, as the trainer records them.
        keys: the metrics to draw (e.g. ``["reward_mean", "kl_token_mean", "clip_frac"]``).
        ncols: panels per row.

    Returns:
        The figure.
    """
    return plot_runs({"": history}, keys, ncols=ncols)
