"""Training logs people can watch while the run goes: JSON lines, and TensorBoard where installed.

Use::

    with RunLog("runs/seed0") as log:          # or trainer.train(log_dir="runs/seed0")
        log.write(step_metrics)                # one line of runs/seed0/metrics.jsonl, flushed
    rows = read_jsonl("runs/seed0/metrics.jsonl")

    tail -f runs/seed0/metrics.jsonl           # the raw numbers, a line per step
    tensorboard --logdir runs                  # the curves (pip install tensorboard)

Every line of ``metrics.jsonl`` is one JSON object with minigrpo's metric names
(``minigrpo.metrics.METRICS``): None is written as null, a NaN or infinite float as the string
"NaN", "Infinity" or "-Infinity" (so each line stays valid JSON), which ``read_jsonl`` turns
back into floats.  A resumed run appends to the same file.  When ``tensorboard`` is importable,
the same numbers go to TensorBoard event files in the same folder, under the tags a TRL 1.16
``GRPOTrainer`` run gets for the same quantity (``train/`` + its name in ``TRL_NAMES``, the prefix
transformers' ``TensorBoardCallback`` adds) and ``minigrpo/<name>`` otherwise, so curves of both
trainers share a tag; their x-axes agree when a GRPO step is one optimiser step (μ = 1, one
mini-batch), since TRL's counts optimiser steps.  Lists of strings (the run doctor's symptom
codes) go to its Text tab.  Imports nothing from the trainer.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path

from minigrpo.metrics import METRICS

METRICS_FILE = "metrics.jsonl"
"""The JSON-lines file a ``RunLog`` writes in its folder."""

TRL_NAMES = {
    "reward_mean": "reward",
    "reward_std": "reward_std",
    "zero_std_frac": "frac_reward_zero_std",
    "truncated_frac": "completions/clipped_ratio",
    "completion_tokens_mean": "completions/mean_length",
    "loss": "loss",
    "policy_loss": "policy_loss",
    "kl_token_mean": "kl",
    "entropy_token_mean": "entropy",
    "clip_frac_low": "clip_ratio/low_mean",
    "clip_frac_high": "clip_ratio/high_mean",
    "clip_frac": "clip_ratio/region_mean",
    "grad_norm": "grad_norm",
    "lr": "learning_rate",
    "sampling_logp_difference_mean": "sampling/sampling_logp_difference/mean",
    "sampling_logp_difference_max": "sampling/sampling_logp_difference/max",
    "importance_sampling_ratio_min": "sampling/importance_sampling_ratio/min",
    "importance_sampling_ratio_mean": "sampling/importance_sampling_ratio/mean",
    "importance_sampling_ratio_max": "sampling/importance_sampling_ratio/max",
}
"""minigrpo's metric name -> the name TRL 1.16's ``GRPOTrainer`` logs the same quantity under
(``_metrics`` in trl/trainer/grpo_trainer.py).  TRL's "kl" and "entropy" are token means
(minigrpo's ``kl`` and ``entropy`` are the terms as the loss aggregates them, logged as
``minigrpo/kl`` and ``minigrpo/entropy``); TRL's clip ratios count the same tokens (under CISPO
TRL logs ``cispo_clip_ratio`` instead, see ``trl_bridge``); ``reward_<name>`` is TRL's
``rewards/<name>/mean``."""


def tensorboard_name(key: str) -> str:
    """The TensorBoard tag of a metric: the tag TRL's run writes for it where TRL logs it
    (``train/<TRL name>``: transformers' ``rewrite_logs`` prefixes every training log key with
    ``train/``), else ``minigrpo/<key>``."""
    if key in TRL_NAMES:
        return f"train/{TRL_NAMES[key]}"
    if key.startswith("reward_") and key not in METRICS:
        return f"train/rewards/{key.removeprefix('reward_')}/mean"
    return f"minigrpo/{key}"


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_value(value):
    """A metric as a JSON value: numbers as int/float (non-finite ones as "NaN", "Infinity",
    "-Infinity"), None, strings and bools as they are, sequences element by element."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        return value if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    raise TypeError(f"cannot log a {type(value).__name__} as a metric")


def _from_json(value):
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, in order, the non-finite strings back as floats.  A last
    line cut short (the run is writing it) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise
                break  # the line being written
            rows.append({k: _from_json(v) for k, v in row.items()})
    return rows


class RunLog:
    """Appends each step's metrics to ``log_dir/metrics.jsonl`` (one line, flushed at once) and,
    where ``tensorboard`` is installed, to TensorBoard event files in ``log_dir``
    (``writer`` is then a ``torch.utils.tensorboard.SummaryWriter``, else None).  Use it as a
    context manager, or call ``close``."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open for the run; close() closes it)
        self.writer = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, metrics: Mapping) -> None:
        """One row: ``metrics`` (its ``step`` is the x axis of its TensorBoard points) as a JSON
        line; its numbers as TensorBoard scalars, its lists of strings as text; None skipped."""
        row = {key: _json_value(value) for key, value in metrics.items()}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self.writer is None:
            return
        step = metrics.get("step")
        for key, value in metrics.items():
            if key == "step" or value is None:
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(tensorboard_name(key), float(value), step)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                self.writer.add_text(tensorboard_name(key), ", ".join(value) or "-", step)
        self.writer.flush()

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
