"""Memory and time of per-token log-probs / entropy: naive PyTorch vs ``minigrpo.logprobs``.

The goal: on logits [4, 512, 151936] float32 (1.24 GB, a Qwen-sized vocabulary) the extra peak
memory of ``minigrpo`` stays below 0.1 × the logits' size, and its time below the naive
``log_softmax(x).gather(...)`` (and ``−Σ softmax(x)·log_softmax(x)`` for the entropy).

Each (case, implementation) runs in a fresh subprocess: it allocates and touches the logits,
reads the peak resident set size (``resource.getrusage(...).ru_maxrss``) as the baseline, runs
the computation a few times, and reads the peak again.  "extra" is the difference, in MB and as
a ratio to the logits' size.  For the backward case the gradient of the logits (1 × their size)
is unavoidable, so it is reported beside "extra beyond the gradient".

    python benchmarks/logprobs_memory.py                  # prints a table and the JSON
    python benchmarks/logprobs_memory.py --out result.json --shape 4 512 151936 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = ("logprobs", "entropy", "fused", "fused_backward")
IMPLS = ("naive", "minigrpo")


def _naive(case: str, logits: torch.Tensor, tokens: torch.Tensor):
    """The textbook code: full [..., V] log_softmax / softmax tensors."""
    if case == "logprobs":
        return (torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1),)
    if case == "entropy":
        return (-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1),)
    logp = torch.log_softmax(logits, -1)  # fused and fused_backward share one log_softmax
    return logp.gather(-1, tokens[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _minigrpo(case: str, logits: torch.Tensor, tokens: torch.Tensor):
    from minigrpo.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy

    if case == "logprobs":
        return (token_logprobs(logits, tokens),)
    if case == "entropy":
        return (token_entropy(logits),)
    return token_logprobs_and_entropy(logits, tokens)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def child(case: str, impl: str, shape: list[int], repeats: int, chunk_elements: int | None) -> dict:
    """One measurement in this (fresh) process."""
    import minigrpo.logprobs

    if chunk_elements:
        minigrpo.logprobs.CHUNK_ELEMENTS = chunk_elements
    torch.manual_seed(0)
    logits = torch.randn(*shape)  # allocated and touched
    tokens = torch.randint(0, shape[-1], shape[:-1])
    backward = case == "fused_backward"
    logits.requires_grad_(backward)
    run = _naive if impl == "naive" else _minigrpo
    baseline = _peak_mb()
    times = []
    for _ in range(repeats):
        logits.grad = None
        start = time.perf_counter()
        outputs = run(case, logits, tokens)
        if backward:
            sum(out.sum() for out in outputs).backward()
        times.append(time.perf_counter() - start)
        del outputs
    logits_mb = logits.numel() * logits.element_size() / 2**20
    extra = _peak_mb() - baseline
    grad_mb = logits_mb if backward else 0.0
    return {
        "case": case,
        "impl": impl,
        "extra_peak_mb": round(extra, 1),
        "extra_ratio": round(extra / logits_mb, 4),
        "extra_beyond_grad_mb": round(extra - grad_mb, 1),
        "extra_beyond_grad_ratio": round((extra - grad_mb) / logits_mb, 4),
        "median_s": round(statistics.median(times), 4),
        "times_s": [round(t, 4) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 512, 151936])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--chunk-elements", type=int, default=None, help="override CHUNK_ELEMENTS")
    parser.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.shape, args.repeats, args.chunk_elements)))
        return

    import minigrpo.logprobs

    results = []
    for case in args.cases:
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--child", case, impl, "--repeats", str(args.repeats),
                   "--shape", *map(str, args.shape)]  # fmt: skip
            if args.chunk_elements:
                cmd += ["--chunk-elements", str(args.chunk_elements)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{case:15s} {impl:9s} extra {r['extra_peak_mb']:8.1f} MB ({r['extra_ratio']:.3f}x logits)"
                  f"  beyond grad {r['extra_beyond_grad_ratio']:.3f}x  median {r['median_s']:.3f} s",
                  file=sys.stderr)  # fmt: skip
    logits_mb = torch.Size(args.shape).numel() * 4 / 2**20
    report = {
        "shape": args.shape,
        "dtype": "float32",
        "logits_mb": round(logits_mb, 1),
        "chunk_elements": args.chunk_elements or minigrpo.logprobs.CHUNK_ELEMENTS,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
