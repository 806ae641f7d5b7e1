"""Peak memory of one GRPO update against ``rows_per_pass``, on the smoke model (SmolLM2-135M).

The update builds the logits of the rows it runs at once, (rows, T + 1, V) in float32, and
their gradient; micro-batches of ``rows_per_pass`` rows (gradient accumulation with the whole
batch's normaliser: the same gradient, ``tests/test_split_invariance.py``) bound that to
``rows_per_pass`` rows.  This measures it: one update of the trainer (``GRPOTrainer.policy_updates``)
on a fixed made-up batch (4 of the package's GSM8K prompts × G = 4 completions of random tokens,
16 to 64 of them, padded to 64; random advantages), with the smoke configuration's
memory savers (LoRA r = 8, gradient checkpointing, β = 0.04 through the adapter-disabled
reference), for each ``rows_per_pass``.

Each setting runs in a fresh subprocess (two torch threads, glibc told to give every block of
64 KiB or more back when freed: ``MALLOC_ENV``): it loads the model, builds the batch (the
reference log-probs scored by the adapter-disabled reference) and runs one update untimed, so
AdamW's state and one-time buffers exist; then it hands freed memory back to the system
(``malloc_trim``), reads its resident set size, resets the kernel's peak counter
(``/proc/self/clear_refs``, Linux), runs a second update and reads the peak (``VmHWM``).
"update peak" is the difference: what one update adds at its highest, the live tensors plus
the allocator's small-block slack.  Chapter 11 compares it with ``models.step_memory``.  The
logits' size rows × (T + 1) × V × 4 bytes is printed beside it.

    python benchmarks/update_memory.py --out benchmarks/results/update_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

PROMPTS, G, T = 4, 4, 64
ROWS_PER_PASS = (16, 8, 4, 2, 1)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc's allocator: every block of 64 KiB or more gets its own mapping, returned to the system
when freed.  By default the threshold rises to 32 MiB once a large block is freed, and freed
blocks below it stay in the process's heap: the resident size then counts dead tensors too
(this benchmark's first version read 2,699 MiB at 16 rows per pass; with this setting and a warmed
update it reads 589 MiB)."""


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in KiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(rows_per_pass: int) -> dict:
    """One measurement in this (fresh) process."""
    from minigrpo import models
    from minigrpo.config import GRPOConfig
    from minigrpo.data import gsm8k_examples, load_gsm8k
    from minigrpo.gsm8k import FIXTURE_DIR
    from minigrpo.rollout import Rollout, score, tokenize_prompts
    from minigrpo.trainer import GRPOTrainer

    torch.set_num_threads(2)
    model, tokenizer = models.load_smoke_model()
    torch.manual_seed(0)  # the same LoRA initialisation in every setting's process: the same update
    model = models.prepare_for_training(model, gradient_checkpointing=True, lora_rank=8)
    config = GRPOConfig(prompts_per_step=PROMPTS, group_size=G, max_new_tokens=T, beta=0.04, eval_size=1,
                        rows_per_pass=rows_per_pass, seed=0)
    examples = gsm8k_examples(load_gsm8k(path=str(FIXTURE_DIR / "train.jsonl")), tokenizer)[:PROMPTS]
    trainer = GRPOTrainer(model, tokenizer, examples, [], config)
    g = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [ex["prompt"] for ex in examples])
    n = PROMPTS * G
    lengths = torch.randint(T // 4, T + 1, (n,), generator=g)
    completion_mask = (torch.arange(T) < lengths[:, None]).long()  # (N, T)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    completion_ids = torch.randint(0, len(tokenizer), (n, T), generator=g) * completion_mask
    batch = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, truncated=lengths == T, old_logprobs=None,
        ref_logprobs=score(trainer.ref_model, prompt_ids, prompt_mask, completion_ids, completion_mask, 1.0, 1),
        completions=[""] * n, answers=[""] * n,
    )
    advantages = torch.randn(n, generator=g)
    trainer.policy_updates(batch, advantages)  # a first update: AdamW's state, one-time buffers
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory back to the system
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current size
    start = time.perf_counter()
    metrics = trainer.policy_updates(batch, advantages)
    seconds = time.perf_counter() - start
    vocab = model.get_output_embeddings().weight.shape[0]
    return {
        "rows_per_pass": rows_per_pass, "rows": n, "prompt_tokens": prompt_ids.shape[1], "completion_tokens": T,
        "vocab": vocab, "update_peak_mib": (_status_kib("VmHWM") - baseline) / 1024,
        "logits_mib": min(rows_per_pass, n) * (T + 1) * vocab * 4 / 2**20, "seconds": seconds,
        "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    runs = []
    for rows_per_pass in ROWS_PER_PASS:
        done = subprocess.run([sys.executable, __file__, "--child", str(rows_per_pass)], check=True,
                              capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"rows_per_pass {r['rows_per_pass']:>2}: update peak {r['update_peak_mib']:7.0f} MiB "
              f"(logits of one pass {r['logits_mib']:5.0f} MiB), {r['seconds']:5.1f} s, loss {r['loss']:.6f}")
    result = {
        "what": "peak resident memory added by one GRPO update (GRPOTrainer.policy_updates) against rows_per_pass, "
                "SmolLM2-135M-Instruct (smoke model) with LoRA r=8, gradient checkpointing, beta=0.04",
        "runs": runs, "torch_version": torch.__version__, "platform": platform.platform(),
        "processor": platform.processor(), "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
