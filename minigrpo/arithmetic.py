"""The tiny world's experiment: a sloppy teacher's warm-up, then GRPO on two-digit addition.

    python -m minigrpo arithmetic --seed 0 --out runs/seed0.json

The supervised warm-up stands in for pre-training (``warmup_model``, cached on disk by its
config); GRPO with an exact-match reward then teaches the carries the demonstrations rarely
showed (``run_arithmetic``).  ``TINY_WARMUP`` / ``TINY_GRPO`` shrink everything so that tests
run in seconds; the numbers they give mean nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minigrpo.data import arithmetic_examples, warmup_examples
from minigrpo.losses import aggregate
from minigrpo.rollout import completion_logprobs, tokenize_prompts
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer, load_tiny, save_tiny
from minigrpo import checkpoints
from minigrpo.config import GRPOConfig, check_number
from minigrpo.distributed import dist_info, gather_objects, params_sha256
from minigrpo.optim import adamw
from minigrpo.trainer import GRPOTrainer


@dataclass
class WarmupConfig:
    """Supervised warm-up of the tiny model on (possibly sloppy) arithmetic demonstrations."""

    digits: int = 2
    """operands have up to this many digits"""
    sloppiness: float = 0.6
    """probability that the teacher drops the carries on a carry problem (0: clean teacher);
    0.6 leaves held-out accuracy at ~0.3-0.45 with the carries mostly wrong, yet sampled often
    enough for the reward to find them"""
    padding: float = 0.0
    """probability that a demonstration writes its answer with 1–3 leading zeros ("068"), so that
    answers vary in length, not in value (the padded-answer task of chapter 8; 0: never)"""
    steps: int = 1500
    """optimiser steps of next-token cross-entropy on the answers"""
    batch_size: int = 64
    """demonstrations per step"""
    lr: float = 1e-3
    """peak AdamW learning rate, cosine-decayed to 0"""
    model: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    """the tiny model's shape"""
    seed: int = 0
    """seeds initialisation, data and batch order"""

    def __post_init__(self):
        for name in ("digits", "steps", "batch_size"):
            check_number(self, name, int, low=1)
        check_number(self, "seed", int, low=0)
        check_number(self, "lr", float, low=0, strict=True)
        for name in ("sloppiness", "padding"):
            check_number(self, name, float, low=0)
            if getattr(self, name) > 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)!r}")


TINY_WARMUP = dict(
    digits=1, steps=100, batch_size=32, lr=3e-3,
    model=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
)
"""--tiny: one-digit sums and a 21k-parameter model (for tests only)"""
TINY_GRPO = dict(prompts_per_step=4, group_size=4, eval_size=12, eval_every=5, lr=3e-3, temperature=1.5)
"""--tiny: a few prompts per step and a handful of held-out problems (for tests only)"""


# ---------------------------------------------------------------- the warm-up (pre-training stand-in)


def supervised_loss(model, tokenizer, batch: list[dict[str, str]]) -> torch.Tensor:
    """Mean −log π(answer tokens, EOS | prompt) over the batch's answer tokens."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [ex["prompt"] for ex in batch])  # (B, L)
    eos = [tokenizer.eos_token_id]
    answers = [tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + eos for ex in batch]
    T = max(len(a) for a in answers)
    completion_ids = torch.tensor([a + [tokenizer.pad_token_id] * (T - len(a)) for a in answers])  # (B, T)
    mask = torch.tensor([[1] * len(a) + [0] * (T - len(a)) for a in answers])  # (B, T)
    logprobs, _ = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask)  # (B, T)
    return aggregate(-logprobs, mask, "dapo")  # a token mean


def supervised_warmup(model, tokenizer, config: WarmupConfig, progress: bool = True) -> list[float]:
    """Train ``model`` on the teacher's demonstrations; returns the loss per step."""
    examples = warmup_examples(config.steps * config.batch_size, config.digits, config.sloppiness, config.seed,
                               config.padding)
    optimizer = adamw(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / config.steps))
    )
    losses = []
    for step in tqdm(range(config.steps), desc="warm-up", disable=not progress):
        batch = examples[step * config.batch_size : (step + 1) * config.batch_size]
        loss = supervised_loss(model, tokenizer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


NUMERICS_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
"""The environment variables that pin the CPU kernels' rounding (``conftest.py`` says why)."""


def numerics_pins() -> dict[str, str | None]:
    """Each of ``NUMERICS_PINS`` as this process has it (None: unset, the libraries' default code)."""
    return {name: os.environ.get(name) for name in NUMERICS_PINS}


def warmup_key(config: WarmupConfig) -> str:
    """A short hash of what decides the warm-up's weights: the cache folder's name.

    It hashes the config's fields, ``torch.__version__``, the CPU numerics pins
    (``NUMERICS_PINS``: each one's value in ``os.environ``, None when unset) and the vector code
    PyTorch's kernels run (``torch.backends.cpu.get_cpu_capability()``, which shows whether
    torch read ``ATEN_CPU_CAPABILITY``).  The pins change the last bits of every float, so a
    warm-up cached without them (or under another torch) is a different model, and a run with
    them must never load it.  MKL and oneDNN read their pins once, when torch is imported, and
    nothing reports whether they did: set the pins before importing torch."""
    key = {"config": dataclasses.asdict(config), "torch": torch.__version__, "numerics_pins": numerics_pins(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    text = json.dumps(key, sort_keys=True)
    return "warmup-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def warmup_model(config: WarmupConfig, cache_dir: str | Path | None = None, progress: bool = True):
    """``(model, tokenizer, info)`` after the supervised warm-up; ``info`` holds ``sft_seconds``,
    ``losses`` and ``cached``.  With ``cache_dir`` the result is saved under a folder named by
    ``warmup_key`` (the config, the torch version and the numerics pins) and loaded from there
    next time, with the same ``info`` (the seconds of the original run).  Under torchrun rank 0
    fills the cache first and the other ranks read it."""
    rank, world_size = dist_info()
    shared_cache = world_size > 1 and cache_dir is not None
    if shared_cache and rank != 0:
        dist.barrier()
    folder = Path(cache_dir) / warmup_key(config) if cache_dir is not None else None
    if folder is not None and (folder / "warmup.json").exists():
        model, tokenizer = load_tiny(folder)
        info = {**json.loads((folder / "warmup.json").read_text()), "cached": True}
    else:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, config.model, seed=config.seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            losses = supervised_warmup(model, tokenizer, config, progress)
        info = {
            "sft_seconds": time.perf_counter() - start,
            "sft_cpu_seconds": time.process_time() - cpu_start,  # all threads; unaffected by other processes
            "losses": losses,
            "config": dataclasses.asdict(config),
        }
        if folder is not None:
            save_tiny(model, tokenizer, folder)
            (folder / "warmup.json").write_text(json.dumps(info))
        info["cached"] = False
    if shared_cache and rank == 0:
        dist.barrier()
    return model, tokenizer, info


# ---------------------------------------------------------------- the run


def run_arithmetic(warmup: WarmupConfig, config: GRPOConfig, *, checkpoint_dir=None, resume: bool = False,
                   stop_after: int | None = None, warmup_cache=None, progress: bool = True, log_dir=None) -> dict:
    """Warm-up, then GRPO; returns the result (JSON-ready): held-out greedy accuracy before and
    after (acc_before, acc_after), the phases' wall times (sft_seconds, grpo_seconds,
    total_seconds), steps, the SHA-256 of the final parameters (params_sha256), both configs,
    the per-step metrics and the evaluations.  ``stop_after`` stops early (checkpointing to
    ``checkpoint_dir``); ``resume`` continues from the checkpoint there (``checkpoints.to_resume``:
    an existing folder without one starts at step 0; a missing folder is a ``ValueError``);
    ``log_dir`` gets the run log (``GRPOTrainer.train``)."""
    start = time.perf_counter()
    rank, world_size = dist_info()
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    resuming = resume and checkpoints.to_resume(checkpoint_dir) is not None
    if resuming:  # the warm-up's outcome lives in the checkpoint
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, warmup.model)  # the weights come from the checkpoint
    else:
        model, tokenizer, warmup_info = warmup_model(warmup, warmup_cache, progress=progress and rank == 0)
    grpo_start, grpo_cpu_start = time.perf_counter(), time.process_time()
    trainer = GRPOTrainer(
        model, tokenizer,
        arithmetic_examples(warmup.digits, held_out=False),
        arithmetic_examples(warmup.digits, held_out=True, size=config.eval_size),
        config,
    )
    if resuming:
        trainer.load_checkpoint(checkpoint_dir)
        warmup_info = trainer.run_info["warmup"]
    else:
        trainer.run_info["warmup"] = {k: warmup_info[k] for k in ("sft_seconds", "sft_cpu_seconds", "cached")}
    resumed_from = trainer.step
    trainer.train(until=stop_after, checkpoint_dir=checkpoint_dir, progress=progress, log_dir=log_dir)
    grpo_seconds, grpo_cpu_seconds = time.perf_counter() - grpo_start, time.process_time() - grpo_cpu_start
    return {
        "task": "arithmetic",
        "seed": config.seed,
        "acc_before": trainer.evals[0].accuracy,
        "acc_after": trainer.evals[-1].accuracy,
        "acc_after_step": trainer.evals[-1].step,  # < steps only when stopped early
        "sft_seconds": warmup_info["sft_seconds"],  # a cached warm-up: the seconds it took when made
        "sft_cached": warmup_info["cached"],
        "grpo_seconds": grpo_seconds,
        "sft_cpu_seconds": warmup_info.get("sft_cpu_seconds"),  # CPU time of all threads: a
        "grpo_cpu_seconds": grpo_cpu_seconds,  # machine-load-independent cost measure
        "total_seconds": time.perf_counter() - start,
        "steps": trainer.step,
        "resumed_from_step": resumed_from,
        "params_sha256": params_sha256(trainer.model),
        "params_sha256_per_rank": gather_objects(params_sha256(trainer.model)),  # identical under DDP
        "shuffle_rewards": config.shuffle_rewards,
        "world_size": world_size,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "config": config.to_dict(),
        "warmup_config": dataclasses.asdict(warmup),
        "evals": [e.summary() for e in trainer.evals],
        "history": trainer.history,
    }
