"""The run doctor: named symptoms of a silently broken GRPO run, read from its logged metrics.

A GRPO run rarely crashes when it goes wrong; it trains on nothing.  Every group ties (all
right, all wrong, all cut at the token limit), the samples of a prompt are duplicates, the
policy collapses or blows up, the gradient vanishes or explodes, the sampler disagrees with the
trainer, or the reward climbs while held-out accuracy falls.  Each has a signature in the
metrics ``minigrpo.metrics.METRICS`` names; ``SYMPTOMS`` lists them, each with the metric(s)
it reads, its thresholds (fields of ``DoctorThresholds``), a likely cause and a fix.

    findings = diagnose(result["history"], result["evals"])   # a finished run, one Finding per episode
    print(format_report(findings))
    doctor = RunDoctor()                                      # a live run: after each step
    new = doctor.check(step_metrics, evals=evals)             # warns on logger "minigrpo", once per episode

    python -m minigrpo doctor RUN.json                        # or a metrics.jsonl, or its folder

Imports nothing from the trainer: it reads plain per-step dicts (some values None), so it works
on the history of a result JSON, on a ``metrics.jsonl`` (``minigrpo.runlog``) and inside the
loop alike.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import numbers
import statistics
import textwrap
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from minigrpo.runlog import METRICS_FILE, read_jsonl

logger = logging.getLogger("minigrpo")


# ---------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class DoctorThresholds:
    """Where each symptom starts; every value is checked when built (``ValueError`` naming the
    field).  The reward thresholds are fractions of the run's reward range (``reward_range``)."""

    no_signal_frac: float = 0.8
    """zero_std_frac (its mean over smooth_steps) at or above which a step has no learning signal; chosen: four groups in five tie and give
    Â = 0, so the step learns from a fifth of its batch (DAPO, Yu et al. 2025 §3.3, resamples such groups away)"""
    easy_reward: float = 0.9
    """reward_mean at or above this fraction of the way from the lowest reward to the highest makes a tied batch
    "all right" (too easy); chosen: with 0/1 rewards, nine completions in ten correct"""
    hard_reward: float = 0.1
    """reward_mean at or below this fraction of the way makes a tied batch "all wrong" (too hard); chosen: with 0/1
    rewards, one completion in ten correct"""
    truncated_frac: float = 0.2
    """truncated_frac (its mean over smooth_steps) at or above which truncation is a symptom; chosen: one completion in five cut at the limit
    (TRL logs the same share as completions/clipped_ratio; the healthy runs of chapters 7-8 stay under 0.15)"""
    never_stop_frac: float = 1.0
    """truncated_frac at or above which no completion is taken to stop; chosen: every completion cut, not one
    EOS in the whole batch"""
    smooth_steps: int = 3
    """the batch shares (zero_std_frac, truncated_frac) and reward_mean are judged by their mean over this
    many steps, this one and those before it (so from this step on); chosen: a 16-group batch's share moves by 1/16 for each
    group that ties by chance, and one noisy step should neither start nor end an episode"""
    baseline_steps: int = 3
    """the first steps whose median is a metric's early value, and the fewest earlier steps a spike is judged
    against; chosen: the median of three ignores one odd step"""
    window: int = 20
    """the earlier steps whose median is a metric's recent level (for spikes and the reward's trend); chosen:
    long enough to average the batch noise of 16-prompt steps, short enough to follow a trend"""
    entropy_collapse: float = 0.1
    """entropy_token_mean at or below this times its early value is a collapse; chosen: a tenfold fall, the
    size of the collapse DAPO (Yu et al. 2025, Fig. 2b) shows without clip-higher"""
    entropy_blowup: float = 2.0
    """entropy_token_mean at or above this times its early value is a blow-up; chosen: in chapter 7's sweep
    (sweep_dials.json) lr=1e-3 goes 0.3 -> 1.5 nats/token as accuracy falls to 0, while no healthy run reaches
    twice its start"""
    entropy_floor: float = 0.5
    """the smallest entropy_token_mean (nats/token) that counts as a blow-up; chosen: below it the policy still
    puts most of each position's mass on one token (a fair choice between two tokens is ln 2 = 0.69 nats), and
    an entropy near 0 doubles by chance (sampling the tiny model at τ = 0.1 it moves between 0.03 and 0.07),
    while the blow-ups of chapter 7's sweep at lr=1e-3 reach 1.3-1.9"""
    kl_spike: float = 10.0
    """kl_token_mean at or above this times its recent median is a spike (also above kl_floor); chosen: an
    order of magnitude in one step"""
    kl_floor: float = 1.0
    """the smallest kl_token_mean (nats/token) that counts as a spike, and in the first steps (no recent
    level yet) the only bar; chosen: the healthy tiny runs of chapters 7-8 (β = 0.04) peak under 1, the ones
    that break reach 3-6 (the field guide's run at lr = 1e-3: 2.3 nats/token at its second step)"""
    ratio_max: float = 10.0
    """ratio_max (π_θ/π_old of one token) at or above which the update overshot; chosen: clipping acts at
    1 + ε ≈ 1.2-1.3, so 10 is far outside the trust region the loss means to keep"""
    sampler_logp_diff: float = 0.05
    """sampling_logp_difference_mean (the mean absolute gap log π_old − log π_rollout, nats/token) at or above
    which sampler and trainer disagree; chosen: a 5% mean probability error per token, several times what one
    engine in one precision shows"""
    sampler_out_of_bounds: float = 0.05
    """importance_sampling_out_of_bounds_frac (tokens whose rollout weight π_old/π_rollout the correction
    clamped or zeroed, outside [C_min, C_max]; TRL 1.16's C_max default is 3) at or above which sampler and
    trainer disagree; chosen: one token in twenty, where the correction reshapes a large part of the gradient"""
    grad_spike: float = 10.0
    """grad_norm at or above this times its recent median is a spike; chosen: the healthy runs of chapters
    7-8 stay within 7x of their median"""
    still_grad_norm: float = 1e-10
    """grad_norm at or below which no gradient reaches the parameters; chosen: zero up to float32 round-off"""
    still_lr: float = 1e-10
    """lr at or below which the optimiser no longer moves the policy; chosen: four orders below the smallest
    useful rate (full fine-tuning, ~1e-6)"""
    gamed_accuracy_drop: float = 0.05
    """fall of held-out accuracy below its best earlier evaluation that, with a rising reward, counts as a
    gamed reward; chosen: about two standard errors on 500 held-out problems near 0.7"""
    gamed_reward_rise: float = 0.1
    """rise of the mean training reward over the same stretch that, with falling accuracy, counts as a gamed
    reward; chosen: a tenth of a reward in [0, 1]"""

    def __post_init__(self):
        fractions = ("no_signal_frac", "easy_reward", "hard_reward", "truncated_frac", "never_stop_frac",
                     "entropy_collapse", "sampler_out_of_bounds", "gamed_accuracy_drop")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int":
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
                if not ok:
                    raise ValueError(f"{field.name} must be an int >= 1, got {value!r}")
                continue
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            if not ok or (field.name in fractions and value > 1):
                bound = "[0, 1]" if field.name in fractions else ">= 0"
                raise ValueError(f"{field.name} must be a finite number {bound}, got {value!r}")
        for name in ("entropy_blowup", "kl_spike", "grad_spike", "ratio_max"):
            if getattr(self, name) <= 1:
                raise ValueError(f"{name} must be > 1 (a factor above the usual level), got {getattr(self, name)!r}")
        for name in ("smooth_steps", "baseline_steps"):  # both read the last ``window`` values
            if getattr(self, name) > self.window:
                raise ValueError(f"{name} ({getattr(self, name)}) must be <= window ({self.window})")
        if self.hard_reward >= self.easy_reward:
            raise ValueError(f"hard_reward ({self.hard_reward}) must be < easy_reward ({self.easy_reward})")


# ---------------------------------------------------------------- what a symptom is


@dataclass(frozen=True)
class Finding:
    """One symptom seen in a run: over ``steps`` (one step from ``RunDoctor.check``; an episode
    of consecutive steps from ``diagnose``), with the observed ``value`` of ``metric`` at its
    worst step and ``detail``, the comparison that fired there."""

    code: str
    steps: tuple[int, ...]
    metric: str
    value: float
    detail: str
    cause: str
    fix: str

    def message(self) -> str:
        """One line for a log: steps, the comparison, the likely cause and the fix."""
        return f"{self.code} at {_steps_text(self.steps)}: {self.detail}. Likely cause: {self.cause} Fix: {self.fix}"


Test = Callable[["_Step", DoctorThresholds], "tuple[str, float, str] | None"]
"""A symptom's test: (metric, observed value, detail) when present at this step, else None."""


@dataclass(frozen=True)
class Symptom:
    """A named symptom: what it reads, where it starts, and what to do about it."""

    code: str
    """short snake_case name (what the history and the log record)"""
    metrics: tuple[str, ...]
    """the logged metrics it reads"""
    thresholds: tuple[str, ...]
    """the ``DoctorThresholds`` fields it compares them with"""
    cause: str
    """the likely cause, one sentence"""
    fix: str
    """the fix, one sentence"""
    test: Test
    """present at this step? (metric, value, detail) or None"""
    worst: Callable[[Iterable[float]], float] = max
    """which value of an episode is its worst (max, or min for a fall)"""


# ---------------------------------------------------------------- one step, with its past


class _Step:
    """One step's metrics beside what the doctor remembers of the steps before it."""

    def __init__(self, metrics: Mapping, past: _Past, evals: list[tuple[int, float]], rewards: tuple[float, float]):
        self.metrics, self.past, self.evals, self.rewards = metrics, past, evals, rewards

    def get(self, key: str) -> float | None:
        """The metric as a float, None when absent or None (NaN and inf pass through)."""
        value = self.metrics.get(key)
        return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None

    def has(self, key: str) -> bool:
        return key in self.metrics

    def smoothed(self, key: str) -> float | None:
        """The metric's mean over this step and the ``smooth_steps`` − 1 steps before it (None
        when this step has none, or before there are that many)."""
        value = self.get(key)
        k = self.past.t.smooth_steps - 1
        before = list(self.past.last.get(key, ()))[-k:] if k else []
        if value is None or len(before) < k:
            return None
        return (value + sum(before)) / (1 + len(before))


class _Past:
    """Per metric: its first ``baseline_steps`` finite values and its last ``window``; the
    reward of every step (for the trend between evaluations)."""

    def __init__(self, t: DoctorThresholds):
        self.t = t
        self.first: dict[str, list[float]] = {}
        self.last: dict[str, deque[float]] = {}
        self.reward_steps: list[int] = []
        self.rewards: list[float] = []

    def early(self, key: str) -> float | None:
        """The median of the metric's first ``baseline_steps`` values, once it has them."""
        values = self.first.get(key, [])
        return statistics.median(values) if len(values) == self.t.baseline_steps else None

    def recent(self, key: str) -> float | None:
        """The median of the metric's last ``window`` positive values, once it has
        ``baseline_steps`` of them (a step with every group tied has a zero gradient: no level)."""
        values = [v for v in self.last.get(key, ()) if v > 0]
        return statistics.median(values) if len(values) >= self.t.baseline_steps else None

    def add(self, metrics: Mapping, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                first = self.first.setdefault(key, [])
                if len(first) < self.t.baseline_steps:
                    first.append(float(value))
                self.last.setdefault(key, deque(maxlen=self.t.window)).append(float(value))
        reward = metrics.get("reward_mean")
        if isinstance(reward, numbers.Real) and not isinstance(reward, bool) and math.isfinite(reward):
            self.reward_steps.append(step)
            self.rewards.append(float(reward))

    def mean_reward(self, after: int, until: int) -> float | None:
        """The mean reward_mean of the steps in (after, until]."""
        lo, hi = bisect.bisect_right(self.reward_steps, after), bisect.bisect_right(self.reward_steps, until)
        return statistics.fmean(self.rewards[lo:hi]) if hi > lo else None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ---------------------------------------------------------------- the tests


def _no_signal(kind: str) -> Test:
    """Most groups tie (zero_std_frac high), for the one likely cause ``kind`` of four, told
    apart in this order: cut at the limit, all right, all wrong, else prompts split between
    always and never solved.  Each share is its mean over the last ``smooth_steps`` steps; the
    reward is placed in the run's reward range (0 at its lowest, 1 at its highest)."""

    def test(s: _Step, t: DoctorThresholds):
        tied, reward, cut = (s.smoothed(k) for k in ("zero_std_frac", "reward_mean", "truncated_frac"))
        if tied is None or not tied >= t.no_signal_frac:
            return None
        lo, hi = s.rewards
        where = None if reward is None else (reward - lo) / (hi - lo)
        if cut is not None and cut >= t.truncated_frac:
            cause = "truncated"
        elif where is not None and where >= t.easy_reward:
            cause = "too_easy"
        elif where is not None and where <= t.hard_reward:
            cause = "too_hard"
        else:
            cause = "duplicates"
        if cause != kind:
            return None
        extra = {"truncated": f", truncated_frac {_fmt(cut or 0)}"}.get(kind, "" if reward is None else f", reward_mean {_fmt(reward)}")
        return "zero_std_frac", tied, f"zero_std_frac {_fmt(tied)} >= {_fmt(t.no_signal_frac)}{extra} (means of {t.smooth_steps} steps)"

    return test


def _above(metric: str, field: str, smooth: bool = False) -> Test:
    """metric (its mean over the last ``smooth_steps`` steps when ``smooth``) >= the threshold ``field``."""

    def test(s: _Step, t: DoctorThresholds):
        value, limit = s.smoothed(metric) if smooth else s.get(metric), getattr(t, field)
        if value is None or not value >= limit:
            return None
        return metric, value, f"{metric} {_fmt(value)} >= {_fmt(limit)}"

    return test


def _against_early(metric: str, field: str, falls: bool, floor: str | None = None) -> Test:
    """metric <= (falls) or >= the threshold ``field`` times its early value (and, rising, >= the
    threshold ``floor`` if given: a rise of a value near 0 is noise, not a blow-up)."""

    def test(s: _Step, t: DoctorThresholds):
        value, early = s.get(metric), s.past.early(metric)
        if value is None or early is None or early <= 0:
            return None
        factor = getattr(t, field)
        limit = factor * early
        if not (value <= limit if falls else value >= max(limit, getattr(t, floor) if floor else 0.0)):
            return None
        sign = "<=" if falls else ">="
        at_least = f", and >= {floor} {_fmt(getattr(t, floor))}" if floor else ""
        return metric, value, (f"{metric} {_fmt(value)} {sign} {_fmt(limit)} ({_fmt(factor)} x its early "
                               f"{_fmt(early)}{at_least})")

    return test


def _spike(metric: str, field: str, floor: str | None = None) -> Test:
    """metric >= the threshold ``field`` times its recent median (and >= ``floor`` if given).
    With a ``floor``, a metric that has no recent level yet (fewer than ``baseline_steps``
    positive values: the first steps) is judged by the floor alone: its level there is its
    start, 0 (the KL: the policy is the reference at the first step), so a jump in the first
    steps, which a too-large update makes at once, is not missed for want of a baseline."""

    def test(s: _Step, t: DoctorThresholds):
        value, level = s.get(metric), s.past.recent(metric)
        if value is None or not math.isfinite(value) or (level is None and floor is None):
            return None
        limit = max(getattr(t, field) * (level or 0.0), getattr(t, floor) if floor else 0.0)
        if not value >= limit:
            return None
        since = f"recent median {_fmt(level)}" if level is not None else f"the first steps: {floor} alone"
        return metric, value, f"{metric} {_fmt(value)} >= {_fmt(limit)} ({since})"

    return test


SAMPLER_METRICS = ("sampling_logp_difference_mean", "importance_sampling_out_of_bounds_frac")
"""The rollout-correction metrics the sampler-mismatch symptom reads (the first is TRL 1.16's
sampling/sampling_logp_difference/mean); they are logged only when a separate sampler draws the
rollouts (or a correction is on), and a run without them is never diagnosed with it."""


def _sampler_mismatch(s: _Step, t: DoctorThresholds):
    for metric, field in zip(SAMPLER_METRICS, ("sampler_logp_diff", "sampler_out_of_bounds")):
        value, limit = s.get(metric), getattr(t, field)
        if value is not None and value >= limit:
            return metric, value, f"{metric} {_fmt(value)} >= {_fmt(limit)}"
    return None


def _grad_not_finite(s: _Step, t: DoctorThresholds):
    norm, skipped = s.get("grad_norm"), s.get("skipped_updates")
    if s.has("grad_norm") and (norm is None or not math.isfinite(norm)):
        return "grad_norm", math.nan if norm is None else norm, f"grad_norm {norm}"
    if skipped is not None and skipped > 0:
        return "skipped_updates", skipped, f"skipped_updates {_fmt(skipped)}"
    return None


def _not_moving(metric: str, field: str) -> Test:
    """metric <= the threshold ``field`` while some group's rewards differ (zero_std_frac < 1)."""

    def test(s: _Step, t: DoctorThresholds):
        value, tied, limit = s.get(metric), s.get("zero_std_frac"), getattr(t, field)
        if value is None or tied is None or not tied < 1 or not value <= limit:
            return None
        return metric, value, f"{metric} {_fmt(value)} <= {_fmt(limit)} while zero_std_frac is {_fmt(tied)}"

    return test


def _gamed_reward(s: _Step, t: DoctorThresholds):
    """The latest evaluation is ``gamed_accuracy_drop`` below the best earlier one while the mean
    reward of the (up to ``window``) steps before the latest rose by ``gamed_reward_rise`` over
    that of the steps after the best."""
    if len(s.evals) < 2:
        return None
    last_step, last_acc = s.evals[-1]
    best_step, best_acc = max(s.evals[:-1], key=lambda e: e[1])
    span = min(t.window, (last_step - best_step) // 2)
    if best_acc - last_acc < t.gamed_accuracy_drop or span < 1:
        return None
    then = s.past.mean_reward(best_step, best_step + span)
    now = s.past.mean_reward(last_step - span, last_step)
    if then is None or now is None or now - then < t.gamed_reward_rise:
        return None
    return "accuracy", last_acc, (f"held-out accuracy {_fmt(best_acc)} (step {best_step}) -> {_fmt(last_acc)} "
                                  f"(step {last_step}) while reward_mean rose {_fmt(then)} -> {_fmt(now)}")


SYMPTOMS: dict[str, Symptom] = {s.code: s for s in [
    Symptom(
        "no_signal_truncated", ("zero_std_frac", "truncated_frac"), ("no_signal_frac", "truncated_frac"),
        "most groups tie because their completions are cut at max_new_tokens before the answer, so all of "
        "them score alike (usually 0).",
        "raise max_new_tokens or ask for shorter answers, and check that the chat template ends the answer "
        "with an EOS the sampler stops on.",
        _no_signal("truncated")),
    Symptom(
        "no_signal_too_easy", ("zero_std_frac", "reward_mean"), ("no_signal_frac", "easy_reward"),
        "most groups tie because every completion is right: the prompts are too easy, their advantages are 0.",
        "train on harder prompts (drop those solved G times out of G), or drop tied groups and sample more "
        "(dynamic_sampling=True).",
        _no_signal("too_easy")),
    Symptom(
        "no_signal_too_hard", ("zero_std_frac", "reward_mean"), ("no_signal_frac", "hard_reward"),
        "most groups tie because every completion is wrong: the prompts are too hard for the model, or the "
        "reward cannot read its answers.",
        "score a few completions by hand to check the reward, then use easier prompts, a warm-up (SFT) or a "
        "larger G so that some completion succeeds.",
        _no_signal("too_hard")),
    Symptom(
        "no_signal_duplicates", ("zero_std_frac", "reward_mean"), ("no_signal_frac", "easy_reward", "hard_reward"),
        "each prompt's G completions score alike, but not all at the best or the worst reward: the samples "
        "are near-duplicates (near-greedy sampling: a low temperature, or top-k, top-p or a repetition "
        "penalty inherited from the checkpoint's generation_config), each prompt is always or never solved, "
        "or a reward part every completion earns (a format reward) sits beside one none earns.",
        "check that one prompt's samples differ (τ near 1, every generation_config setting reset); if they "
        "do, drop tied groups and sample more (dynamic_sampling=True) or filter the prompts by difficulty.",
        _no_signal("duplicates")),
    Symptom(
        "truncation", ("truncated_frac",), ("truncated_frac",),
        "a large share of the completions hit max_new_tokens: they are cut before their answer and score as "
        "wrong, which teaches length, not reasoning.",
        "raise max_new_tokens, or keep cut completions out of the loss (mask_truncated=True) or penalise "
        "them smoothly (overlong_cache > 0).",
        _above("truncated_frac", "truncated_frac", smooth=True)),
    Symptom(
        "never_stops", ("truncated_frac",), ("never_stop_frac",),
        "no completion ends with an EOS: max_new_tokens is shorter than even the shortest answer, or the EOS "
        "the model writes is not one the sampler stops on, or the chat template never shows one, so the model "
        "never learnt to stop.",
        "read a few completions: cut mid-answer, raise max_new_tokens above a whole answer's length; running "
        "on past the answer, check tokenizer.eos_token_id against every EOS id the model emits (generation "
        "stops on all of them) and that the template and the warm-up data end answers with it.",
        _above("truncated_frac", "never_stop_frac")),
    Symptom(
        "entropy_collapse", ("entropy_token_mean",), ("entropy_collapse", "baseline_steps"),
        "the policy has become near-deterministic: a prompt's samples are nearly identical, exploration stops "
        "and groups soon tie (too high a learning rate, or clipping that only lets likely tokens grow).",
        "lower the learning rate, raise eps_high (DAPO's clip-higher, 0.28) or add a small entropy bonus "
        "(alpha); a collapsed policy rarely recovers, so restart from an earlier checkpoint.",
        _against_early("entropy_token_mean", "entropy_collapse", falls=True), worst=min),
    Symptom(
        "entropy_blowup", ("entropy_token_mean",), ("entropy_blowup", "entropy_floor", "baseline_steps"),
        "the policy is spreading its probability toward noise: updates too large (learning rate, few tokens "
        "per step) or too strong an entropy bonus push it toward uniform sampling.",
        "lower the learning rate or alpha, and look for gradient spikes before it.",
        _against_early("entropy_token_mean", "entropy_blowup", falls=False, floor="entropy_floor")),
    Symptom(
        "kl_spike", ("kl_token_mean",), ("kl_spike", "kl_floor", "window"),
        "the policy jumped away from the reference in one step: an oversized update (a gradient spike, too "
        "high a learning rate), or tokens the policy now finds near-impossible while π_ref does not (k3 grows "
        "exponentially in d = log π_ref − log π_θ).",
        "lower the learning rate (a larger beta cannot act on the first step, where π_θ = π_ref and the KL's "
        "gradient is 0), keep gradient clipping on, and read the step's completions for degenerate text.",
        _spike("kl_token_mean", "kl_spike", "kl_floor")),
    Symptom(
        "ratio_spike", ("ratio_max",), ("ratio_max",),
        "a token's probability grew far beyond π_old's within the step's updates: the updates overshoot (many "
        "passes or mini-batches, a high learning rate), or π_old's log-probs are not the sampler's.",
        "lower the learning rate, num_updates or num_minibatches, and compute π_old with the temperature and "
        "weights that sampled.",
        _above("ratio_max", "ratio_max")),
    Symptom(
        "sampler_mismatch", SAMPLER_METRICS, ("sampler_logp_diff", "sampler_out_of_bounds"),
        "the sampler's log-probs differ from the trainer's for the same tokens: another engine or precision, "
        "stale sampler weights, or sampling settings (temperature, top-k, top-p) applied on one side only.",
        "sample and score with the same weights, dtype and temperature, and where they must differ correct "
        "with truncated or masked importance sampling (rollout_correction).",
        _sampler_mismatch),
    Symptom(
        "grad_not_finite", ("grad_norm", "skipped_updates"), (),
        "an optimiser step was skipped: its gradient was NaN or inf (half-precision overflow, the log of a "
        "probability that underflowed to 0, a NaN reward), or its mini-batch was empty.",
        "look for NaN or inf in the step's rewards and log-probs, compute log-probs in float32, and lower the "
        "learning rate.",
        _grad_not_finite),
    Symptom(
        "grad_spike", ("grad_norm",), ("grad_spike", "window"),
        "the gradient norm jumped far above its recent level: a batch of rare, long or degenerate completions, "
        "or instability building up.",
        "keep gradient clipping on (max_grad_norm near 1), lower the learning rate, and read the step's "
        "completions.",
        _spike("grad_norm", "grad_spike")),
    Symptom(
        "zero_gradient", ("grad_norm", "zero_std_frac"), ("still_grad_norm",),
        "some groups' rewards differ but no gradient reaches the parameters: every token masked "
        "(mask_truncated with every completion cut), advantages zeroed, or the parameters frozen.",
        "check which parameters require grad, the loss mask (masked_frac) and the advantages "
        "(advantages_abs_mean).",
        _not_moving("grad_norm", "still_grad_norm"), worst=min),
    Symptom(
        "lr_collapsed", ("lr", "zero_std_frac"), ("still_lr",),
        "the learning rate is about 0 while rewards still differ: the schedule decayed to 0 before the run's "
        "end (its horizon shorter than the run) or the rate was set far too small.",
        "set the schedule's horizon to the run's real number of optimiser steps and check the rate of the "
        "first steps.",
        _not_moving("lr", "still_lr"), worst=min),
    Symptom(
        "gamed_reward", ("reward_mean", "accuracy"), ("gamed_accuracy_drop", "gamed_reward_rise", "window"),
        "the training reward rises while held-out accuracy falls: the policy exploits the reward (a form it "
        "accepts without a right answer, a parser loophole) or overfits the training prompts.",
        "read completions that score high but are wrong, tighten the reward (exact answer extraction), and "
        "keep the checkpoint with the best held-out accuracy.",
        _gamed_reward, worst=min),
]}
"""Every symptom the doctor knows, by code, in the order reports list them."""


# ---------------------------------------------------------------- the doctor


def _eval_points(evals) -> list[tuple[int, float]]:
    """(step, accuracy) of each evaluation, by step: dicts with those keys (a result JSON's
    ``evals``) or objects with those attributes (``EvalResult``)."""
    points = []
    for e in evals or ():
        step, acc = (e["step"], e["accuracy"]) if isinstance(e, Mapping) else (e.step, e.accuracy)
        if acc is not None:
            points.append((int(step), float(acc)))
    return sorted(points)


def reward_range(weights: Sequence[float] = (1.0,), overlong_penalty: bool = False) -> tuple[float, float]:
    """The lowest and highest reward r = Σ_k w_k·r_k a completion can get when each r_k is in
    [0, 1] (the package's reward functions), with DAPO's overlong penalty (in [−1, 0], weight 1)
    when ``overlong_penalty``; (0, 1) when every weight is 0."""
    lo = sum(min(w, 0.0) for w in weights) - float(overlong_penalty)
    hi = sum(max(w, 0.0) for w in weights)
    return lo, max(hi, lo + 1.0)  # all weights 0: every reward is 0, at the bottom of any range


class RunDoctor:
    """Watches a run step by step.  ``check`` returns the symptoms that start at this step and
    logs each as a warning on logger ``minigrpo`` (with its cause and fix) once per episode: an
    episode ends at the first step without the symptom.  ``present`` holds the codes present at
    the last step checked.  ``rewards``: the run's (lowest, highest) possible reward
    (``reward_range``), where tied groups' mean reward tells "all right" from "all wrong".
    ``log=False``: the same findings, nothing logged (a second rank)."""

    def __init__(self, thresholds: DoctorThresholds | None = None, *, rewards: tuple[float, float] = (0.0, 1.0),
                 log: bool = True):
        self.thresholds = thresholds or DoctorThresholds()
        if not rewards[1] > rewards[0]:
            raise ValueError(f"rewards must be (lowest, highest) with lowest < highest, got {rewards!r}")
        self.rewards = tuple(rewards)
        self.log = log
        self.present: tuple[str, ...] = ()
        self._past = _Past(self.thresholds)
        self._steps = 0

    def observe(self, metrics: Mapping, evals=()) -> list[Finding]:
        """Every symptom present at this step (the step is ``metrics["step"]``, else the count of
        steps observed), judged against the steps observed before; only evaluations made at or
        before this step count.  Remembers the step; logs nothing."""
        self._steps += 1
        step = int(metrics.get("step") or self._steps)
        points = [p for p in _eval_points(evals) if p[0] <= step]
        view = _Step(metrics, self._past, points, self.rewards)
        found = []
        for symptom in SYMPTOMS.values():
            hit = symptom.test(view, self.thresholds)
            if hit is not None:
                metric, value, detail = hit
                found.append(Finding(symptom.code, (step,), metric, value, detail, symptom.cause, symptom.fix))
        self._past.add(metrics, step)
        return found

    def check(self, metrics: Mapping, evals=()) -> list[Finding]:
        """``observe`` this step; return (and log) the findings whose episode starts here."""
        found = self.observe(metrics, evals)
        new = [f for f in found if f.code not in self.present]
        self.present = tuple(f.code for f in found)
        if self.log:
            for finding in new:
                logger.warning("run doctor: %s", finding.message())
        return new

    def catch_up(self, history: Sequence[Mapping], evals=()) -> None:
        """Take in the steps of a run resumed from a checkpoint, logging nothing, so that the
        steps that follow are judged as in a run that never stopped."""
        for metrics in history:
            self.present = tuple(f.code for f in self.observe(metrics, evals))


def diagnose(history: Sequence[Mapping], evals=None, thresholds: DoctorThresholds | None = None,
             rewards: tuple[float, float] = (0.0, 1.0)) -> list[Finding]:
    """Every episode of every symptom in a run's ``history`` (per-step metric dicts, some
    values None) and ``evals`` (``{step, accuracy}`` each), for rewards in the range ``rewards``:
    one ``Finding`` per episode, its consecutive steps and its worst value, ordered by first step
    then by ``SYMPTOMS``' order.  Pure: logs nothing, keeps nothing."""
    doctor = RunDoctor(thresholds, rewards=rewards, log=False)
    order = list(SYMPTOMS)
    open_: dict[str, list[Finding]] = {}
    done: list[list[Finding]] = []
    for metrics in history:
        found = {f.code: f for f in doctor.observe(metrics, evals or ())}
        for code in [c for c in open_ if c not in found]:
            done.append(open_.pop(code))
        for code, finding in found.items():
            open_.setdefault(code, []).append(finding)
    done += open_.values()

    def episode(findings: list[Finding]) -> Finding:  # the worst step's finding, with every step
        values = [f.value for f in findings if not math.isnan(f.value)]
        worst = SYMPTOMS[findings[0].code].worst(values) if values else findings[0].value
        chosen = next((f for f in findings if f.value == worst), findings[0])
        return dataclasses.replace(chosen, steps=tuple(f.steps[0] for f in findings))

    findings = [episode(e) for e in done]
    return sorted(findings, key=lambda f: (f.steps[0], order.index(f.code)))


# ---------------------------------------------------------------- reading a run, reporting


@dataclass
class Run:
    """What the doctor reads of a run: its per-step ``history``, its ``evals`` (``{step,
    accuracy}``) and its reward range (``reward_range``)."""

    history: list[dict]
    evals: list[dict]
    rewards: tuple[float, float] = (0.0, 1.0)


def load_run(path: str | Path) -> Run:
    """A run from a result JSON of ``python -m minigrpo`` (its ``history``; its ``evals``, or
    ``eval_before``/``eval_after``; the reward range from its config's ``reward_weights`` and
    ``overlong_cache``), a ``metrics.jsonl`` written by ``runlog.RunLog``, or a folder holding one
    (the reward range then that of one 0/1 reward).  In a log, rows with ``accuracy`` are
    evaluations, the others steps; a step logged twice (a run resumed from an earlier
    checkpoint) keeps its last row."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        evals = {r.get("step", 0): {"step": r.get("step", 0), "accuracy": r["accuracy"]}
                 for r in rows if r.get("accuracy") is not None}
        steps = {}
        for row in rows:
            metrics = {k: v for k, v in row.items() if k != "accuracy"}
            if set(metrics) - {"step"}:
                steps[metrics.get("step", len(steps) + 1)] = metrics
        return Run(list(steps.values()), list(evals.values()))
    result = json.loads(path.read_text())
    if "history" not in result:
        raise ValueError(f"{path} has no per-step 'history' (a result JSON of python -m minigrpo, or a metrics.jsonl)")
    evals = result.get("evals") or [result[k] for k in ("eval_before", "eval_after") if k in result]
    config = result.get("config") if isinstance(result.get("config"), Mapping) else result.get("run", {}).get("grpo", {})
    rewards = reward_range(config.get("reward_weights", (1.0,)), bool(config.get("overlong_cache")))
    return Run(result["history"], evals, rewards)


def _steps_text(steps: Sequence[int]) -> str:
    if len(steps) == 1:
        return f"step {steps[0]}"
    if list(steps) == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}-{steps[-1]}"
    return "steps " + ",".join(map(str, steps))


def format_report(findings: Sequence[Finding], width: int = 38) -> str:
    """A plain-text table, one row per finding: symptom, steps, observed value, likely cause and
    fix (those two wrapped to ``width`` characters); "no symptoms" when there is none."""
    if not findings:
        return "no symptoms"
    header = ("symptom", "steps", "value", "likely cause", "fix")
    rows = [(f.code, _steps_text(f.steps).split(" ", 1)[1], f"{f.metric}={_fmt(f.value)}",
             textwrap.wrap(f.cause, width), textwrap.wrap(f.fix, width)) for f in findings]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)] + [width, width]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for code, steps, value, cause, fix in rows:
        if len(lines) > 2:
            lines.append("")
        for i in range(max(len(cause), len(fix))):
            cells = (code, steps, value) if i == 0 else ("", "", "")
            cells += (cause[i] if i < len(cause) else "", fix[i] if i < len(fix) else "")
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)
