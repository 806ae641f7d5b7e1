"""The run log: one valid JSON line per step, readable while the run writes it (None, NaN and
infinities included), and the same numbers as TensorBoard scalars under TRL's names."""

import json
import math

import pytest

from minigrpo.metrics import METRICS
from minigrpo.runlog import (
    METRICS_FILE,
    TRL_NAMES,
    RunLog,
    read_jsonl,
    tensorboard_name,
)

ROWS = [
    {"step": 0, "accuracy": 0.25},
    {"step": 1, "reward_mean": 0.5, "kl": None, "kl_token_mean": 0.125, "grad_norm": math.inf, "lr": 1e-4,
     "symptoms": []},
    {"step": 2, "reward_mean": 0.75, "kl": 0.5, "kl_token_mean": 0.25, "grad_norm": math.nan, "lr": 1e-4,
     "policy_loss": -math.inf, "reward_format_reward": 0.125, "symptoms": ["grad_not_finite", "kl_spike"]},
]


def strict_json(line: str) -> dict:
    """JSON as the standard has it: NaN and Infinity are not numbers there."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_each_step_is_one_valid_json_line_read_back_while_the_run_goes(tmp_path):
    with RunLog(tmp_path / "run") as log:
        for row in ROWS:
            log.write(row)
            assert len(read_jsonl(tmp_path / "run" / METRICS_FILE)) == ROWS.index(row) + 1  # flushed per line
    lines = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3 and all(strict_json(line) for line in lines)
    assert strict_json(lines[2])["grad_norm"] == "NaN" and strict_json(lines[1])["kl"] is None
    back = read_jsonl(tmp_path / "run" / METRICS_FILE)
    assert back[1]["kl"] is None and back[1]["grad_norm"] == math.inf and back[2]["policy_loss"] == -math.inf
    assert math.isnan(back[2]["grad_norm"]) and back[2]["symptoms"] == ["grad_not_finite", "kl_spike"]
    assert back[0] == ROWS[0] and back[2]["reward_format_reward"] == 0.125


def test_a_resumed_run_appends_and_a_half_written_line_is_skipped(tmp_path):
    with RunLog(tmp_path) as log:
        log.write(ROWS[0])
    with RunLog(tmp_path) as log:
        log.write(ROWS[1])
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 3, "rew')  # the line the run is writing now
    assert [r["step"] for r in read_jsonl(tmp_path / METRICS_FILE)] == [0, 1]


def test_tensorboard_scalars_under_trl_names(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLog(tmp_path) as log:
        assert log.writer is not None
        for row in ROWS:
            log.write(row)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reward", "train/kl", "minigrpo/kl", "train/learning_rate", "train/grad_norm", "minigrpo/accuracy",
            "train/rewards/format_reward/mean", "train/policy_loss"} <= tags
    assert "step" not in tags and "minigrpo/symptoms" not in tags  # the x axis; text, not a scalar
    assert [(e.step, e.value) for e in events.Scalars("train/reward")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("minigrpo/kl")] == [(2, 0.5)]  # None: no point
    assert [(e.step, e.value) for e in events.Scalars("train/kl")] == [(1, 0.125), (2, 0.25)]  # TRL's kl: per token
    assert math.isinf(events.Scalars("train/grad_norm")[0].value)


def test_the_trl_mapping_names_logged_metrics():
    assert set(TRL_NAMES) <= set(METRICS)
    assert len(set(TRL_NAMES.values())) == len(TRL_NAMES)  # one minigrpo name per TRL name
    assert tensorboard_name("zero_std_frac") == "train/frac_reward_zero_std"
    assert tensorboard_name("entropy") == "minigrpo/entropy" and tensorboard_name("entropy_token_mean") == "train/entropy"


def test_tensorboard_tags_are_the_ones_a_trl_run_writes():
    # a TRL run logs through transformers' TensorBoardCallback, which renames every key with rewrite_logs
    from transformers.integrations.integration_utils import rewrite_logs

    for key, trl_name in TRL_NAMES.items():
        assert list(rewrite_logs({trl_name: 0.0})) == [tensorboard_name(key)]
    assert list(rewrite_logs({"rewards/format_reward/mean": 0.0})) == [tensorboard_name("reward_format_reward")]
