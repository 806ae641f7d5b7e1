"""Every number the trainer logs: one name, one axis label, written once per step.

The trainer records each step's metrics in a ``MetricLog``, which refuses a name that is not
in ``METRICS`` or that was already written; the plots take their axis labels from the same
list.  Imports nothing, so a figure module can use it without pulling in the trainer.
"""

from __future__ import annotations

METRICS = {
    "step": "GRPO step",
    "reward_mean": "mean reward of the step's samples",
    "reward_std": "reward std over the step's samples",
    "zero_std_frac": "fraction of groups with equal rewards",
    "groups_sampled": "groups sampled (prompts rolled out)",
    "truncated_frac": "fraction of completions cut at max_new_tokens",
    "loss": "loss (as minimised)",
    "policy_loss": "policy-gradient loss",
    "kl": "KL term, aggregated as the loss (nats)",
    "kl_token_mean": "KL to reference (nats/token)",
    "entropy": "entropy term, aggregated as the loss (nats)",
    "entropy_token_mean": "entropy (nats/token)",
    "clip_frac_low": "fraction of tokens clipped below",
    "clip_frac_high": "fraction of tokens clipped above",
    "clip_frac": "fraction of tokens clipped",
    "ratio_mean": "mean ratio ρ",
    "ratio_min": "smallest ratio ρ",
    "ratio_max": "largest ratio ρ",
    "advantages_abs_mean": "mean |advantage|",
    "zero_advantage_frac": "fraction of completions with advantage 0",
    "completion_tokens_mean": "completion length (tokens)",
    "completion_tokens_pos_adv": "length of completions with Â > 0 (tokens)",
    "completion_tokens_neg_adv": "length of completions with Â < 0 (tokens)",
    "sampling_logp_difference_mean": "mean |log π_rollout − log π_old| (nats/token)",
    "sampling_logp_difference_max": "largest |log π_rollout − log π_old| (nats)",
    "sampling_seq_log_ratio_std": "std over completions of Σ_t log(π_old/π_rollout) (nats)",
    "importance_sampling_ratio_min": "smallest rollout weight w",
    "importance_sampling_ratio_mean": "mean rollout weight w",
    "importance_sampling_ratio_max": "largest rollout weight w",
    "importance_sampling_out_of_bounds_frac": "fraction of tokens whose w was clamped or zeroed",
    "off_policy_masked_frac": "fraction of completions the off-policy mask drops",
    "grad_norm": "gradient norm before clipping",
    "skipped_updates": "optimiser steps skipped (empty mini-batch or non-finite gradient)",
    "masked_frac": "fraction of completions with no token in the loss",
    "lr": "learning rate",
    "step_seconds": "seconds per step",
    "peak_memory_gib": "peak GPU memory (GiB)",
    "accuracy": "held-out accuracy (greedy)",
    "symptoms": "the run doctor's symptoms present at the step (a list of codes, not a number)",
}
"""Every number the trainer logs, by name, with its axis label.  Each is computed in exactly one
place: ``sample_batch`` (rewards, sampled groups, truncation), ``train_step`` (time), ``grpo_loss``'s metrics (clip fractions, ratios,
token means; the sampler's mismatch, the rollout correction and the off-policy mask, ``rollout_metrics``),
``GRPOTrainer.update`` (loss terms, gradient norm, masked share), ``policy_updates`` (skipped
updates), ``evaluate`` (accuracy), ``GRPOTrainer.train`` (the run doctor's ``symptoms``).  Besides
these, ``reward_<name>`` is the batch mean of the reward function ``<name>``."""


def metric_label(key: str) -> str:
    """The axis label of a logged metric (``KeyError`` for a name nobody logs)."""
    if key.startswith("reward_") and key not in METRICS:
        return f"mean {key.removeprefix('reward_')} reward"
    return METRICS[key]


class MetricLog(dict):
    """One step's metrics: every key is in ``METRICS`` and is written once."""

    def __setitem__(self, key, value):
        if key in self:
            raise KeyError(f"metric {key!r} written twice")
        metric_label(key)
        super().__setitem__(key, value)

    def update(self, other=(), **kwargs):
        for key, value in dict(other, **kwargs).items():
            self[key] = value


REDUCE_OVER_UPDATES = {"ratio_min": min, "ratio_max": max, "sampling_logp_difference_max": max,
                       "importance_sampling_ratio_min": min, "importance_sampling_ratio_max": max}
"""How a metric of several updates becomes the step's: these by min/max, every other by the mean."""


def reduce_updates(records: list[dict[str, float | None]]) -> dict[str, float | None]:
    """One value per metric from the step's μ × mini-batch updates, over the updates that have
    one (None where none has: no reference model, no completion with Â > 0 in a mini-batch)."""
    out = {}
    for key in dict.fromkeys(k for r in records for k in r):  # every key any update has, in order
        values = [r[key] for r in records if r.get(key) is not None]
        reduce = REDUCE_OVER_UPDATES.get(key, lambda v: sum(v) / len(v))
        out[key] = reduce(values) if values else None
    return out
