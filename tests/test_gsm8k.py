"""The GSM8K run: its uncertainty, its configurations, and the command end to end (smoke)."""

import json
import math
import os
import subprocess
import sys

import pytest

from minigrpo import gsm8k


@pytest.mark.parametrize(
    "correct, n, expected",
    [(50, 100, (0.4038, 0.5962)), (0, 2, (0.0, 0.6576)), (10, 10, (0.7225, 1.0)), (659, 1319, (0.4727, 0.5266))],
)
def test_wilson_interval_known_values(correct, n, expected):
    lo, hi = gsm8k.wilson_interval(correct, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)
    assert 0.0 <= lo <= correct / n <= hi <= 1.0


@pytest.mark.parametrize("correct, n", [(3, 2), (-1, 5), (0, 0)])
def test_wilson_interval_rejects_bad_counts(correct, n):
    with pytest.raises(ValueError, match="correct"):
        gsm8k.wilson_interval(correct, n)


def test_smoke_requested_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv("MINIGRPO_SMOKE", raising=False)
    assert not gsm8k.smoke_requested()
    assert gsm8k.smoke_requested(True)
    monkeypatch.setenv("MINIGRPO_SMOKE", "1")
    assert gsm8k.smoke_requested()


def test_configurations():
    real, smoke = gsm8k.real_run(), gsm8k.smoke_run()
    assert real.model == "Qwen/Qwen2.5-0.5B-Instruct" and real.data_dir is None and real.eval_size is None
    assert smoke.model == "smoke" and smoke.device == "cpu"
    for run in (real, smoke):
        assert run.grpo.reward_funcs == ("correctness", "format")
        assert run.grpo.accuracy_reward == "correctness"
    assert (gsm8k.FIXTURE_DIR / "train.jsonl").exists() and (gsm8k.FIXTURE_DIR / "test.jsonl").exists()


def test_command_line_smoke_run(tmp_path):
    """``python -m minigrpo gsm8k --smoke --out x.json``, one step: the whole pipeline on the CPU
    with SmolLM2-135M-Instruct, offline (about a minute, most of it loading the model)."""
    out = tmp_path / "x.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-m", "minigrpo", "gsm8k", "--smoke", "--out", str(out),
         "--steps", "1", "--eval-size", "1", "--no-progress"],
        check=True, env=env, timeout=900,
    )
    result = json.loads(out.read_text())
    assert result["config"] == "smoke" and result["steps"] == 1 and result["n_eval"] == 1
    assert "SmolLM2-135M-Instruct" in result["model"]
    assert 0 < result["trainable_parameters"] < result["parameters"]  # LoRA
    step = result["history"][0]
    assert 0.0 <= step["reward_mean"] <= 2.0
    assert all(math.isfinite(step[k]) for k in ("loss", "kl", "entropy", "grad_norm"))
    assert 0.0 <= result["acc_before"] <= 1.0 and len(result["acc_after_wilson95"]) == 2
    sample = result["samples"][0]
    assert sample["answer"] == "15" and isinstance(sample["before"], str)
