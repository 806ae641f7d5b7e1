"""``python -m minigrpo arithmetic`` at tiny settings (``--tiny``: one-digit sums, a 30k-parameter
model): the JSON has its keys, and a run stopped and resumed from its checkpoint ends with the
same parameters as one run straight."""

import json

import pytest
import torch

from minigrpo.__main__ import arithmetic_configs, build_parser, main
from minigrpo.doctor import load_run


pytestmark = pytest.mark.usefixtures("one_thread")


KEYS = {"acc_before", "acc_after", "sft_seconds", "grpo_seconds", "total_seconds", "steps",
        "params_sha256", "config", "warmup_config", "history", "evals", "seed"}


def run(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    status = main(["arithmetic", "--tiny", "--no-progress", "--threads", "1", "--seed", "1", "--out", str(out), *extra])
    assert status is None  # the console script exits with main()'s value: 0, not a dict printed to stderr
    return json.loads(out.read_text())


def test_cli_json_and_exact_resume(tmp_path):
    cache = str(tmp_path / "cache")
    straight = run(tmp_path, "straight", "--steps", "6", "--warmup-cache", cache, "--log-dir", str(tmp_path / "log"))
    assert KEYS <= set(straight)
    assert straight["steps"] == 6 and len(straight["history"]) == 6 and not straight["sft_cached"]
    assert 0.0 <= straight["acc_before"] <= 1.0 and len(straight["params_sha256"]) == 64
    assert any(h["grad_norm"] > 0 for h in straight["history"])  # the steps did train
    logged = load_run(tmp_path / "log")  # the run log: every step, and the evaluations
    assert logged.history == straight["history"] and [e["step"] for e in logged.evals] == [0, 5, 6]

    ck = str(tmp_path / "ck")
    half = run(tmp_path, "half", "--steps", "6", "--stop-after", "3", "--checkpoint-dir", ck, "--warmup-cache", cache)
    assert half["steps"] == 3 and half["sft_cached"]
    resumed = run(tmp_path, "resumed", "--steps", "6", "--checkpoint-dir", ck, "--resume")
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["evals"] == straight["evals"]
    assert resumed["sft_seconds"] == straight["sft_seconds"]  # the cached warm-up keeps its time


def test_cli_overrides_reach_the_configs():
    args = build_parser().parse_args(["arithmetic", "--out", "x.json", "--set", "beta=0", "--set",
                                      "lr_schedule=cosine", "--warmup-set", "sloppiness=0.3"])
    warmup, config = arithmetic_configs(args)
    assert config.beta == 0 and config.lr_schedule == "cosine" and warmup.sloppiness == 0.3
    for bad in ("nope=1", "reward_weights=(1.0,", "steps=1.5", "lr=fast", "reward_funcs=len"):
        with pytest.raises(SystemExit):  # unknown name, a typo'd tuple, wrong types, a callable
            arithmetic_configs(build_parser().parse_args(["arithmetic", "--out", "x", "--set", bad]))
    args = build_parser().parse_args(["arithmetic", "--out", "x", "--set", "lr=1", "--set", "eps_high=None"])
    assert arithmetic_configs(args)[1].eps_high is None


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["arithmetic", "--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "--checkpoint-dir" in out and "--shuffle-rewards" in out and "--log-dir" in out


def test_small_model_command_builds_its_run_and_prints_the_result(monkeypatch, capsys, tmp_path):
    """``small-model --seed S [--shuffle-rewards] [--set …]`` hands the configuration to
    run_gsm8k (replaced here: the real run takes minutes) and writes what it returns."""
    from minigrpo import gsm8k

    seen = {}

    def fake_run(run, progress=True, log_dir=None):
        seen["run"] = run
        return {"acc_before": 0.25, "acc_after": 0.5, "n_eval": run.grpo.eval_size, "p_value": 0.01}

    monkeypatch.setattr(gsm8k, "run_gsm8k", fake_run)
    out = tmp_path / "small.json"
    main(["small-model", "--seed", "2", "--shuffle-rewards", "--set", "steps=3", "--out", str(out), "--threads", "1"])
    run = seen["run"]
    assert run.name == "small-model" and run.task == "word_problems" and run.model == "smoke"
    assert run.grpo.seed == 2 and run.grpo.shuffle_rewards and run.grpo.steps == 3
    assert json.loads(out.read_text())["n_eval"] == run.grpo.eval_size
    assert "0.250 -> 0.500" in capsys.readouterr().out


def test_headline_gives_the_numerics_pins_to_the_arithmetic_runs_only():
    """benchmarks/headline.py reads the pins from conftest.py, which sets them where it runs:
    the script must undo that, or the small-model runs would inherit MKL's slow SSE2 path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    pins = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
    env = {k: v for k, v in os.environ.items() if k not in pins}
    code = ("import os, runpy; g = runpy.run_path('benchmarks/headline.py', run_name='headline'); "
            "print(sorted(k for k in g['PINNED_CPU_NUMERICS'] if k in os.environ))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resume_from_a_missing_folder_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(ValueError, match="no folder"):
        run(tmp_path, "typo", "--steps", "2", "--checkpoint-dir", str(tmp_path / "chekpoints"), "--resume")
    (tmp_path / "new").mkdir()  # an existing, empty folder: the run starts there
    assert run(tmp_path, "fresh", "--steps", "2", "--checkpoint-dir", str(tmp_path / "new"), "--resume")["steps"] == 2
