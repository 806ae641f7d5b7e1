"""The run doctor: every symptom produced in a synthetic history and diagnosed (and a healthy
history with none), the live doctor's once-per-episode warnings, real tiny runs (one with every
completion cut at the token limit, one healthy), and ``python -m minigrpo doctor``."""

import copy
import dataclasses
import inspect
import json
import logging
import math

import pytest

from minigrpo.__main__ import main
from minigrpo.doctor import (
    SYMPTOMS,
    DoctorThresholds,
    Finding,
    RunDoctor,
    diagnose,
    format_report,
    load_run,
    reward_range,
)
from minigrpo.metrics import METRICS
from minigrpo.runlog import RunLog

pytestmark = pytest.mark.usefixtures("one_thread")


def healthy(steps: int = 30) -> list[dict]:
    """A run that learns: rewards vary within groups and rise, nothing spikes (a little
    deterministic noise on every metric)."""
    history = []
    for s in range(1, steps + 1):
        wobble = 0.02 * math.sin(1.7 * s)  # (-0.02, 0.02)
        history.append({
            "step": s, "reward_mean": 0.4 + 0.01 * s + wobble, "reward_std": 0.45, "zero_std_frac": 0.3 + wobble,
            "truncated_frac": 0.05 + wobble, "loss": 0.01, "kl_token_mean": 0.05 + 0.002 * s + wobble,
            "entropy_token_mean": 0.6 - 0.005 * s + wobble, "ratio_max": 1.2 + wobble, "grad_norm": 2.0 + 10 * wobble,
            "skipped_updates": 0, "lr": 1e-4, "sampling_logp_difference_mean": 0.01 + 0.1 * wobble,
            "importance_sampling_out_of_bounds_frac": 0.0, "completion_tokens_pos_adv": None,
        })
    return history


HEALTHY_EVALS = [{"step": 0, "accuracy": 0.40}, {"step": 10, "accuracy": 0.55}, {"step": 20, "accuracy": 0.62},
                 {"step": 30, "accuracy": 0.66}]


def broken(changes: dict, start: int = 11, stop: int = 30) -> list[dict]:
    """The healthy run with ``changes`` from step ``start`` to ``stop`` (inclusive)."""
    return [{**h, **changes} if start <= h["step"] <= stop else h for h in healthy()]


CASES = {  # symptom -> (history, evals, every code diagnose must find)
    "no_signal_truncated": (broken({"zero_std_frac": 1.0, "reward_mean": 0.0, "truncated_frac": 0.9}), HEALTHY_EVALS,
                            {"no_signal_truncated", "truncation"}),
    "no_signal_too_easy": (broken({"zero_std_frac": 0.9, "reward_mean": 0.97}), HEALTHY_EVALS, {"no_signal_too_easy"}),
    "no_signal_too_hard": (broken({"zero_std_frac": 0.95, "reward_mean": 0.02}), HEALTHY_EVALS, {"no_signal_too_hard"}),
    "no_signal_duplicates": (broken({"zero_std_frac": 0.9, "reward_mean": 0.5}), HEALTHY_EVALS, {"no_signal_duplicates"}),
    "truncation": (broken({"truncated_frac": 0.4}), HEALTHY_EVALS, {"truncation"}),
    "never_stops": (broken({"truncated_frac": 1.0}), HEALTHY_EVALS, {"truncation", "never_stops"}),
    "entropy_collapse": (broken({"entropy_token_mean": 0.03}), HEALTHY_EVALS, {"entropy_collapse"}),
    "entropy_blowup": (broken({"entropy_token_mean": 1.8}), HEALTHY_EVALS, {"entropy_blowup"}),
    "kl_spike": (broken({"kl_token_mean": 3.0}, 15, 15), HEALTHY_EVALS, {"kl_spike"}),
    "ratio_spike": (broken({"ratio_max": 40.0}, 15, 16), HEALTHY_EVALS, {"ratio_spike"}),
    "sampler_mismatch": (broken({"sampling_logp_difference_mean": 0.3}), HEALTHY_EVALS, {"sampler_mismatch"}),
    "grad_not_finite": (broken({"grad_norm": None, "skipped_updates": 1}, 15, 15), HEALTHY_EVALS, {"grad_not_finite"}),
    "grad_spike": (broken({"grad_norm": 90.0}, 15, 15), HEALTHY_EVALS, {"grad_spike"}),
    "zero_gradient": (broken({"grad_norm": 0.0}), HEALTHY_EVALS, {"zero_gradient"}),
    "lr_collapsed": (broken({"lr": 0.0}), HEALTHY_EVALS, {"lr_collapsed"}),
    "gamed_reward": ([{**h, "reward_mean": 0.5 if h["step"] <= 20 else 0.8} for h in healthy()],
                     [{"step": 0, "accuracy": 0.4}, {"step": 10, "accuracy": 0.7}, {"step": 20, "accuracy": 0.7},
                      {"step": 30, "accuracy": 0.5}], {"gamed_reward"}),
}


def test_a_healthy_history_has_no_symptom():
    assert diagnose(healthy(), HEALTHY_EVALS) == []
    assert format_report([]) == "no symptoms"


def test_every_symptom_has_a_case():
    assert set(CASES) == set(SYMPTOMS)


@pytest.mark.parametrize("code", list(CASES))
def test_each_symptom_is_diagnosed(code):
    history, evals, expected = CASES[code]
    findings = diagnose(history, evals)
    assert {f.code for f in findings} == expected
    finding = next(f for f in findings if f.code == code)
    assert finding.cause == SYMPTOMS[code].cause and finding.fix == SYMPTOMS[code].fix
    assert finding.metric in SYMPTOMS[code].metrics
    assert code in format_report(findings) and finding.detail in finding.message()


def test_an_episode_is_its_consecutive_steps_with_its_worst_value():
    history = healthy()
    for h, value in zip(history[9:14], [8.0, 12.0, 30.0, 11.0, 1.2]):  # steps 10-14: 8 is below 10, 1.2 ends it
        h["ratio_max"] = value
    history[19]["ratio_max"] = 11.0  # step 20: a second episode
    (first, second) = diagnose(history)
    assert (first.code, first.steps, first.value) == ("ratio_spike", (11, 12, 13), 30.0)
    assert (second.steps, second.value) == ((20,), 11.0)
    collapse = diagnose(broken({"entropy_token_mean": 0.03}, 11, 12) + [])[0]
    assert collapse.value == 0.03 and collapse.steps == (11, 12)  # a fall's worst value is its lowest


def test_a_kl_jump_in_the_first_steps_is_a_spike():
    """The KL starts at 0 (the policy is the reference); a too-large first update puts it at
    2.3 nats/token at once, before there is a recent level to compare with: the floor alone
    judges those first steps, until baseline_steps positive values give a level (then 2.5
    against a median of 2.4 is no spike).  Below the floor, nothing."""
    history = healthy()
    for h, kl in zip(history, [0.0, 2.3, 2.5, 2.4] + [2.5] * 26):
        h["kl_token_mean"] = kl
    (finding,) = diagnose(history)
    assert (finding.code, finding.steps, finding.value) == ("kl_spike", (2, 3, 4), 2.5)
    assert "the first steps: kl_floor alone" in finding.detail
    for h, kl in zip(history, [0.0, 0.9, 0.95, 0.9]):  # a fast start, but under kl_floor
        h["kl_token_mean"] = kl
    assert diagnose(history) == []


def test_an_entropy_near_zero_that_doubles_is_no_blowup():
    """Sampling at τ = 0.1 the entropy is a few hundredths of a nat and doubles by chance: below
    entropy_floor that is no blow-up; the same doubling above it is (the case of CASES)."""
    history = broken({"entropy_token_mean": 0.07})
    for h in history[:10]:
        h["entropy_token_mean"] = 0.03
    assert diagnose(history) == []
    (finding,) = diagnose(history, thresholds=DoctorThresholds(entropy_floor=0.05))
    assert finding.code == "entropy_blowup" and finding.steps == tuple(range(11, 31))
    assert "entropy_floor 0.05" in finding.detail


def test_the_doctor_warns_once_per_episode(caplog):
    """A symptom present at steps 2-4 and 6 starts two episodes: two warnings, each with the
    cause and the fix; the steps in between return nothing new."""
    history = healthy(8)
    for s in (2, 3, 4, 6):
        history[s - 1]["ratio_max"] = 25.0
    doctor = RunDoctor()
    with caplog.at_level(logging.WARNING, logger="minigrpo"):
        new = [doctor.check(h) for h in history]
    assert [[f.steps for f in n] for n in new] == [[], [(2,)], [], [], [], [(6,)], [], []]
    warnings = [r for r in caplog.records if r.name == "minigrpo"]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert SYMPTOMS["ratio_spike"].cause in warnings[0].getMessage()
    assert SYMPTOMS["ratio_spike"].fix in warnings[0].getMessage()
    assert doctor.present == ()  # step 8 is healthy


def test_a_resumed_doctor_judges_as_one_that_never_stopped():
    history, evals, _ = CASES["entropy_collapse"]
    straight = RunDoctor(log=False)
    expected = [straight.check(h, evals) for h in history]
    resumed = RunDoctor(log=False)
    resumed.catch_up(history[:12], evals)  # the episode began at step 11: step 13 is not new
    assert [resumed.check(h, evals) for h in history[12:]] == expected[12:]


def test_only_evaluations_made_by_a_step_count_at_it():
    history, evals, _ = CASES["gamed_reward"]
    doctor = RunDoctor(log=False)
    codes = [[f.code for f in doctor.observe(h, evals)] for h in history]
    assert codes[28] == [] and codes[29] == ["gamed_reward"]  # the falling evaluation is step 30's


def test_every_threshold_is_documented_and_checked():
    source = inspect.getsource(DoctorThresholds)
    for field in dataclasses.fields(DoctorThresholds):
        after = source.split(f"    {field.name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), field.name
    for symptom in SYMPTOMS.values():
        assert set(symptom.metrics) <= set(METRICS), symptom.code
        assert set(symptom.thresholds) <= {f.name for f in dataclasses.fields(DoctorThresholds)}, symptom.code
        assert symptom.cause.endswith(".") and symptom.fix.endswith("."), symptom.code


@pytest.mark.parametrize("changes, name", [
    ({"no_signal_frac": 1.5}, "no_signal_frac"), ({"kl_spike": 1.0}, "kl_spike"), ({"window": 0}, "window"),
    ({"smooth_steps": 2.5}, "smooth_steps"), ({"still_lr": -1.0}, "still_lr"), ({"ratio_max": math.inf}, "ratio_max"),
    ({"hard_reward": 0.95}, "hard_reward"), ({"baseline_steps": 30}, "baseline_steps"), ({"truncated_frac": True}, "truncated_frac"),
])
def test_thresholds_reject_bad_values(changes, name):
    with pytest.raises(ValueError, match=name):
        DoctorThresholds(**changes)


def test_the_reward_range_tells_all_right_from_a_part_every_completion_earns():
    """Groups tied at r = 1: all right when r is in [0, 1]; beside a format reward (r in [0, 2])
    every completion is formatted and none right, not a batch too easy."""
    history = broken({"zero_std_frac": 0.95, "reward_mean": 1.0})
    assert [f.code for f in diagnose(history)] == ["no_signal_too_easy"]
    assert [f.code for f in diagnose(history, rewards=reward_range((1.0, 1.0)))] == ["no_signal_duplicates"]
    assert reward_range((1.0, 0.5)) == (0.0, 1.5) and reward_range((1.0, -0.5), overlong_penalty=True) == (-1.5, 1.0)
    assert reward_range((0.0,)) == (0.0, 1.0)
    with pytest.raises(ValueError, match="rewards"):
        RunDoctor(rewards=(1.0, 1.0))


def test_thresholds_move_the_diagnosis():
    history = broken({"truncated_frac": 0.4})
    assert diagnose(history, thresholds=DoctorThresholds(truncated_frac=0.5)) == []
    assert isinstance(diagnose(history)[0], Finding)


# ---------------------------------------------------------------- the doctor on the command line


def test_doctor_cli_reads_a_result_json(tmp_path, capsys):
    history, evals, _ = CASES["no_signal_too_hard"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"history": history, "evals": evals, "acc_before": 0.4}))
    assert main(["doctor", str(path)]) is None
    out = capsys.readouterr().out
    assert "no_signal_too_hard" in out and "13-30" in out and SYMPTOMS["no_signal_too_hard"].fix[:30] in out
    path.write_text(json.dumps({"history": healthy(), "eval_before": HEALTHY_EVALS[0], "eval_after": HEALTHY_EVALS[-1]}))
    main(["doctor", str(path)])
    assert capsys.readouterr().out.strip() == "no symptoms"
    tied_at_one = broken({"zero_std_frac": 0.95, "reward_mean": 1.0})  # a gsm8k-style result: r = correct + format
    path.write_text(json.dumps({"history": tied_at_one, "run": {"grpo": {"reward_weights": [1.0, 1.0]}}}))
    main(["doctor", str(path)])
    assert "no_signal_duplicates" in capsys.readouterr().out


def test_doctor_cli_reads_a_metrics_jsonl(tmp_path, capsys):
    """The log of a run: steps and evaluation rows, a step logged twice (resumed from an earlier
    checkpoint) counted once; the folder or the file."""
    history, evals, _ = CASES["gamed_reward"]
    accuracy = {e["step"]: e["accuracy"] for e in evals}
    rows = [{"step": 0, "accuracy": accuracy[0]}]
    rows += [{**h, "accuracy": accuracy[h["step"]]} if h["step"] in accuracy else h for h in history]
    with RunLog(tmp_path) as log:
        for row in rows[:26] + rows[21:]:  # steps 0-25, then 21-30 again: resumed from step 20's checkpoint
            log.write(row)
    run = load_run(tmp_path)
    assert [h["step"] for h in run.history] == list(range(1, 31)) and run.evals == evals
    main(["doctor", str(tmp_path)])
    assert "gamed_reward" in capsys.readouterr().out
    main(["doctor", str(tmp_path / "metrics.jsonl")])
    assert "gamed_reward" in capsys.readouterr().out


# ---------------------------------------------------------------- real tiny runs


@pytest.fixture(scope="module")
def warmed():
    """The tiny world's model after a short supervised warm-up (one-digit sums, ~4 s): it
    stops, and earns a reward a fifth of the time."""
    import torch

    from minigrpo.arithmetic import TINY_WARMUP, WarmupConfig, warmup_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer, _ = warmup_model(WarmupConfig(**{**TINY_WARMUP, "steps": 400, "seed": 1}), progress=False)
    torch.set_num_threads(threads)
    return model, tokenizer


def tiny_trainer(warmed, train_examples=None, **overrides):
    from minigrpo.config import GRPOConfig
    from minigrpo.data import arithmetic_examples
    from minigrpo.trainer import GRPOTrainer

    model, tokenizer = warmed
    config = GRPOConfig(**{"prompts_per_step": 8, "group_size": 8, "eval_size": 14, "eval_every": 4, "max_new_tokens": 4,
                                  "lr": 1e-3, "steps": 8, "seed": 0, **overrides})
    return GRPOTrainer(copy.deepcopy(model), tokenizer, train_examples or arithmetic_examples(1),
                       arithmetic_examples(1, held_out=True), config)


def test_completions_cut_at_the_limit_are_diagnosed(warmed, caplog, tmp_path):
    """Two-digit answers and max_new_tokens=1: every completion is cut before its answer, every
    group scores 0.  The trainer warns of truncation and of no learning signal for that reason
    (once each), records them in the history and its log, and a run resumed from a checkpoint
    goes on with the same diagnosis without warning again of what it already said."""
    from minigrpo.data import arithmetic_examples

    two_digit = [ex for ex in arithmetic_examples(1) if len(ex["answer"]) == 2]
    trainer = tiny_trainer(warmed, two_digit, max_new_tokens=1, steps=6)
    with caplog.at_level(logging.WARNING, logger="minigrpo"):
        trainer.train(progress=False, log_dir=tmp_path / "log")
    messages = [r.getMessage() for r in caplog.records if r.name == "minigrpo"]
    assert sum(m.startswith("run doctor: no_signal_truncated at step 3") for m in messages) == 1
    assert any("raise max_new_tokens" in m for m in messages)
    never = [m for m in messages if m.startswith("run doctor: never_stops")]  # not one EOS: the limit is named
    assert never and all("max_new_tokens is shorter than even the shortest answer" in m for m in never)
    assert sum(m.startswith("run doctor: truncation at step 3") for m in messages) == 1
    codes = [h["symptoms"] for h in trainer.history]
    assert not {"truncation", "no_signal_truncated"} & {c for step in codes[:2] for c in step}  # from 3 steps on
    assert all({"truncation", "no_signal_truncated"} <= set(c) for c in codes[2:])
    logged = load_run(tmp_path / "log")
    assert [h["symptoms"] for h in logged.history] == codes and [e["step"] for e in logged.evals] == [0, 4, 6]

    caplog.clear()
    first = tiny_trainer(warmed, two_digit, max_new_tokens=1, steps=6)
    with caplog.at_level(logging.WARNING, logger="minigrpo"):
        first.train(until=4, checkpoint_dir=tmp_path / "ck", progress=False)
        resumed = tiny_trainer(warmed, two_digit, max_new_tokens=1, steps=6)
        resumed.load_checkpoint(tmp_path / "ck")
        n = len(caplog.records)
        resumed.train(progress=False)
    assert [h["symptoms"] for h in resumed.history] == codes
    assert not [r for r in caplog.records[n:] if "no_signal_truncated" in r.getMessage()]


def test_a_healthy_tiny_run_raises_no_warning(warmed, caplog, capsys, tmp_path):
    trainer = tiny_trainer(warmed)
    with caplog.at_level(logging.WARNING, logger="minigrpo"):
        trainer.train(progress=False, log_dir=tmp_path)
    assert not [r for r in caplog.records if r.name == "minigrpo"]
    assert all(h["symptoms"] == [] for h in trainer.history)
    assert any(h["zero_std_frac"] < 1 for h in trainer.history)  # it did learn from something
    main(["doctor", str(tmp_path)])
    assert capsys.readouterr().out.strip() == "no symptoms"
