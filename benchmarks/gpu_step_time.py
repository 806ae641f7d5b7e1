"""GRPO step time, generation throughput and peak memory at Qwen2.5-0.5B-Instruct's real size.

A randomly initialised model of Qwen2.5-0.5B-Instruct's architecture (the config is written
out in ``minigrpo.models.qwen25_05b_config``; nothing is downloaded) goes through the trainer's
real step: G = 8 completions of 512 new tokens for each of 8 prompts (a random model never
emits EOS, so every completion is full length: the worst case), old and reference log-probs,
the GRPO loss in mini-batches, AdamW.  Weights are random, so rewards and losses are
meaningless; shapes, FLOPs and memory are those of the real run.

    python benchmarks/gpu_step_time.py --out runs/gpu_step_time.json                 # a CUDA GPU
    python benchmarks/gpu_step_time.py --out runs/gpu_step_time.json --lora-rank 0   # full fine-tuning
    python benchmarks/gpu_step_time.py --tiny --out runs/gpu_step_time_tiny.json     # CPU check

Without a GPU it refuses, unless ``--tiny`` asks for a tiny model (hidden size 64, 2 layers,
G = 2, 16 new tokens) that only checks the script runs; its JSON says ``"size": "tiny"``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from minigrpo import models
from minigrpo.config import GRPOConfig
from minigrpo.rollout import sample_completions, tokenize_prompts
from minigrpo.tiny import build_tokenizer
from minigrpo.trainer import GRPOTrainer

REAL = dict(prompts=8, group_size=8, max_new_tokens=512, prompt_chars=150, minibatches=2)  # the real run's
TINY = dict(prompts=2, group_size=2, max_new_tokens=16, prompt_chars=20, minibatches=1)
TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1)


def digit_prompts(count: int, chars: int, seed: int) -> list[dict[str, str]]:
    """Prompts of ``chars`` random digits (one token each with the character tokenizer, whose
    16 ids are valid Qwen ids too): prompts of a fixed length without a Qwen tokenizer."""
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice("0123456789") for _ in range(chars)), "answer": "0"}
            for _ in range(count)]


def cuda_sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generation_throughput(model, tokenizer, examples, shape: dict, device: str) -> dict:
    """Seconds and new tokens per second of one ``generate`` call: P prompts × G samples,
    timed after an untimed short call (run it after the steps: a first long call in a process
    pays the allocator's and kernels' first-use costs, 23.6 s against ≤ 12.5 s for a whole
    step in benchmarks/results/gpu/gpu_step_time_lora32.json)."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [ex["prompt"] for ex in examples], device)
    model.eval()
    generate = lambda max_new_tokens: sample_completions(  # noqa: E731
        model, tokenizer, prompt_ids, prompt_mask, group_size=shape["group_size"],
        temperature=1.0, max_new_tokens=max_new_tokens,
    )[0]  # (P·G, T)
    generate(8)
    cuda_sync(device)
    start = time.perf_counter()
    completion_ids = generate(shape["max_new_tokens"])
    cuda_sync(device)
    seconds = time.perf_counter() - start
    tokens = completion_ids.numel()
    return {"generation_seconds": seconds, "generated_tokens": tokens,
            "generated_tokens_per_s": tokens / seconds}


def rows_per_pass(lora_rank: int, device: str) -> int:
    """The real configuration's ``rows_per_pass`` for this GPU (``gsm8k.plan_memory``); 16 for the tiny check."""
    if device != "cuda":
        return 16
    from minigrpo import gsm8k

    return gsm8k.real_run(device=device, lora_rank=lora_rank).grpo.rows_per_pass


def step_times(model, tokenizer, examples, shape: dict, lora_rank: int, steps: int, device: str) -> dict:
    """Median seconds and peak memory of ``steps`` GRPO steps of the trainer (after one warm-up
    step that is not counted)."""
    config = GRPOConfig(
        steps=steps + 1, prompts_per_step=shape["prompts"], group_size=shape["group_size"],
        max_new_tokens=shape["max_new_tokens"], num_minibatches=shape["minibatches"],
        beta=0.04, lr=1e-5, eval_every=0, rows_per_pass=rows_per_pass(lora_rank, device),
    )
    trainer = GRPOTrainer(model, tokenizer, examples, examples[:1], config)
    trainer.train_step()  # warm-up: kernels, allocator, optimizer state
    seconds = []
    with models.peak_memory(device) as memory:
        for _ in range(steps):
            seconds.append(trainer.train_step()["step_seconds"])
    return {"rows_per_pass": config.rows_per_pass, "step_seconds_median": statistics.median(seconds), "step_seconds": seconds,
            "peak_memory_gib": memory["peak_gib"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA r; 0: full fine-tuning")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script on a CPU")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("no CUDA GPU: this benchmark measures the real size on a GPU; "
                 "pass --tiny to check the script on the CPU with a tiny model")
    shape = TINY if args.tiny else REAL
    config = models.qwen25_05b_config(**(TINY_ARCH if args.tiny else {}))
    dtype = models.choose_dtype(device, lora=args.lora_rank > 0)
    if device == "cuda":
        models.enable_tf32()
    torch.manual_seed(0)
    model = models.random_model(config, seed=0, device=device, dtype=dtype)
    model = models.prepare_for_training(
        model, gradient_checkpointing=not args.no_gradient_checkpointing, lora_rank=args.lora_rank
    )
    tokenizer = build_tokenizer()
    examples = digit_prompts(4 * shape["prompts"], shape["prompt_chars"], seed=0)
    trainable, total = models.count_parameters(model)
    result = {
        "size": "tiny: a script check, NOT Qwen2.5-0.5B's size" if args.tiny else "Qwen2.5-0.5B-Instruct architecture, random weights",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "lora_rank": args.lora_rank,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "parameters": total, "trainable_parameters": trainable, **shape,
        "torch": torch.__version__,
    }
    # Steps first: the one generate call timed after them finds the kernels and the allocator warm.
    result.update(step_times(model, tokenizer, examples, shape, args.lora_rank, args.steps, device))
    result.update(generation_throughput(model, tokenizer, examples[: shape["prompts"]], shape, device))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
