"""The GSM8K run: its uncertainty, its configurations, and the command end to end (smoke)."""

import json
import math
import os
import subprocess
import sys

import pytest

from minigrpo import gsm8k
from minigrpo.rewards import correctness_reward, format_reward
from minigrpo.tiny import build_tokenizer


def test_smoke_requested_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv("MINIGRPO_SMOKE", raising=False)
    assert not gsm8k.smoke_requested()
    assert gsm8k.smoke_requested(True)
    monkeypatch.setenv("MINIGRPO_SMOKE", "1")
    assert gsm8k.smoke_requested()


def test_configurations():
    real, smoke, small = gsm8k.real_run(), gsm8k.smoke_run(), gsm8k.small_model_run(seed=2)
    assert small.task == "word_problems" and small.model == "smoke" and small.device == "cpu"
    assert small.grpo.eval_size >= 300 and small.grpo.shared_prefill and small.grpo.seed == 2
    assert small.grpo.reward_funcs == (correctness_reward,) and not small.grpo.shuffle_rewards
    assert gsm8k.small_model_run(shuffle_rewards=True).grpo.shuffle_rewards
    with pytest.raises(ValueError, match="task"):
        gsm8k.GSM8KRun(name="x", task="trivia")
    assert real.model == "Qwen/Qwen2.5-0.5B-Instruct" and real.data_dir is None
    assert real.grpo.eval_size == 1319 and real.grpo.eval_tokens > real.grpo.max_new_tokens
    assert gsm8k.real_run(lora_rank=0).grpo.lr < real.grpo.lr  # full fine-tuning: its own rate
    assert smoke.model == "smoke" and smoke.device == "cpu"
    for run in (real, smoke):
        assert run.grpo.reward_funcs == (correctness_reward, format_reward)
        assert run.grpo.accuracy_reward is correctness_reward
    assert (gsm8k.FIXTURE_DIR / "train.jsonl").exists() and (gsm8k.FIXTURE_DIR / "test.jsonl").exists()


def test_the_real_configuration_is_fitted_to_its_gpu(monkeypatch):
    """``plan_memory``: float32 on a T4 with 8 rows per pass (16 would pass the modelled budget
    only without its 15% margin), the whole 32-row mini-batch in bfloat16 on an H100; the GPU
    the machine has decides when none is named; too small a GPU is a ValueError."""
    import torch

    from minigrpo import models

    t4, h100 = gsm8k.real_run(gpu="T4").grpo, gsm8k.real_run(gpu="H100").grpo
    assert (t4.rows_per_pass, h100.rows_per_pass) == (8, 32)
    assert t4.max_new_tokens == h100.max_new_tokens == 512
    config = models.qwen25_05b_config()
    for name, c in (("T4", t4), ("H100", h100)):
        total, capability = gsm8k.GPUS[name]
        dtype = models.gpu_dtype(capability, lora=True)
        def peak(rows):
            return models.step_memory(config, rows=rows, prompt_tokens=gsm8k.PROMPT_TOKENS, completion_tokens=512,
                                      sampled_rows=64, dtype=dtype, lora_rank=32).total
        assert peak(c.rows_per_pass) <= gsm8k.gpu_budget(total)
        assert c.rows_per_pass == 32 or peak(2 * c.rows_per_pass) > gsm8k.gpu_budget(total)
    assert gsm8k.real_run(gpu="T4", lora_rank=0).grpo.rows_per_pass == 4  # a float32 reference and AdamW's state
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), {"total_memory": 16e9})())
    assert gsm8k.real_run().grpo.rows_per_pass == 8  # the machine's own GPU: a T4
    with pytest.raises(ValueError, match="does not fit"):
        gsm8k.plan_memory(gsm8k.real_run(gpu="T4"), 4e9, (7, 5))


@pytest.mark.slow
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
    assert 0.0 <= result["acc_before"] <= 1.0 and len(result["eval_after"]["wilson95"]) == 2
    assert 0.0 <= result["eval_before"]["truncated_frac"] <= 1.0 and 0.0 < result["p_value"] <= 1.0
    sample = result["samples"][0]
    assert sample["answer"] == "15" and isinstance(sample["before"], str)


def test_word_problem_examples_for_the_small_model_run():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    run = gsm8k.small_model_run()
    test = gsm8k.load_examples(run, tokenizer, "test")
    train = gsm8k.load_examples(run, tokenizer, "train")
    assert len(test) == run.grpo.eval_size and len(train) > len(test)
    assert all(ex["prompt"].endswith("<|assistant|>") and ex["answer"].isdigit() for ex in test)
    assert not {ex["prompt"] for ex in test} & {ex["prompt"] for ex in train}


@pytest.mark.slow
def test_a_stopped_and_resumed_smoke_run_ends_as_a_straight_one(tmp_path, monkeypatch):
    """``gsm8k --smoke`` stopped after step 1 and resumed from its checkpoint ends with the same
    parameters, bit for bit, and the same history as the run made straight; the checkpoint
    holds the LoRA adapter, not the frozen base."""
    from minigrpo.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = tmp_path / "ck"

    def run(name, *extra):
        out = tmp_path / f"{name}.json"
        main(["gsm8k", "--smoke", "--steps", "2", "--eval-size", "1", "--no-progress", "--threads", "1",
              "--out", str(out), *extra])
        return json.loads(out.read_text())

    straight = run("straight")
    half = run("half", "--checkpoint-dir", str(ck), "--stop-after", "1")
    assert half["steps"] == 1 and half["acc_after_step"] == 0  # no evaluation after step 1 of 2
    adapter_mib = (ck / "model.safetensors").stat().st_size / 2**20
    assert adapter_mib < 0.05 * half["parameters"] * 4 / 2**20  # the adapter, not 135M float32 weights
    resumed = run("resumed", "--checkpoint-dir", str(ck), "--resume")
    assert resumed["resumed_from_step"] == 1 and resumed["steps"] == 2
    assert resumed["params_sha256"] == straight["params_sha256"]
    strip = lambda h: [{k: v for k, v in m.items() if k != "step_seconds"} for m in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    assert resumed["eval_after"] == straight["eval_after"]
