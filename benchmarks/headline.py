"""The CPU headlines: three seeds and a shuffled-reward control of one command.

    python benchmarks/headline.py arithmetic    # -> benchmarks/results/arithmetic_headline.json
    python benchmarks/headline.py small-model   # -> benchmarks/results/small_model_headline.json

Runs ``python -m minigrpo COMMAND`` (2 torch threads) for seeds 0, 1 and 2, then the control
(rewards shuffled within each batch) for seed 0, each in a fresh process, alone, and writes a
JSON summary beside the per-run JSON files: per run held-out greedy accuracy before/after, the
gain, the phases' wall times and the whole command's, and whether each seed met its targets:

- ``arithmetic`` (chapter 7): gain ≥ 0.45, GRPO ≤ 60 s, whole command ≤ 180 s.  Warm-ups are
  cached in runs/warmup-cache: a cached warm-up reports the seconds of the run that made it,
  and the control (seed 0) reuses seed 0's; ``total_seconds`` then adds those seconds back.
- ``small-model`` (chapter 11): gain ≥ 0.15 with a paired McNemar p < 0.01, whole command
  ≤ 15 minutes.

Times depend on the machine and on what else runs on it.  The arithmetic runs get the numerics
pins of ``conftest.py`` (unless already set), so that seed 0 reproduces chapter 7's digits; the
small-model runs, which no notebook re-executes, run with the libraries' fastest code.  The
summary records the pins and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import runpy
from pathlib import Path

TARGETS = {
    "arithmetic": {"gain": 0.45, "grpo_seconds": 60.0, "command_seconds": 180.0},
    "small-model": {"gain": 0.15, "p_value_below": 0.01, "command_seconds": 900.0},
}
WARMUP_CACHE = Path("runs/warmup-cache")  # the arithmetic control reuses seed 0's warm-up (same model)
_ENVIRON = dict(os.environ)
PINNED_CPU_NUMERICS = runpy.run_path(str(Path(__file__).parent.parent / "conftest.py"))["PINNED_CPU_NUMERICS"]
os.environ.clear()  # running conftest.py also set the pins here; only the arithmetic runs get them
os.environ.update(_ENVIRON)
RUNS = [("seed0", 0, []), ("seed1", 1, []), ("seed2", 2, []), ("control_seed0", 0, ["--shuffle-rewards"])]


def run_cli(command_name: str, name: str, seed: int, extra: list[str], folder: Path, threads: int) -> dict:
    """One CLI run in a fresh process; returns its JSON plus the process's wall time."""
    out = folder / f"{command_name.replace('-', '_')}_{name}.json"
    if command_name == "arithmetic":
        extra = ["--warmup-cache", str(WARMUP_CACHE), *extra]
    command = [sys.executable, "-m", "minigrpo", command_name, "--seed", str(seed), "--out", str(out),
               "--no-progress", "--threads", str(threads), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if command_name == "arithmetic":  # the chapters' numerics, so that seed 0 is chapter 7's run
        env = {**PINNED_CPU_NUMERICS, **env}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    result = json.loads(out.read_text())
    result["command_seconds"] = time.perf_counter() - start
    result["command"] = " ".join(command[1:])
    return result


def summarise(command_name: str, name: str, seed: int, r: dict) -> dict:
    """One row of the summary: accuracies, the gain, times, and whether the targets were met."""
    gain = r["acc_after"] - r["acc_before"]
    row = {"run": name, "seed": seed, "shuffle_rewards": "control" in name, "acc_before": r["acc_before"], "acc_after": r["acc_after"],
           "gain": gain, "command_seconds": r["command_seconds"], "steps": r["steps"]}
    targets = TARGETS[command_name]
    if command_name == "arithmetic":
        row.update({k: r[k] for k in ("sft_seconds", "grpo_seconds", "sft_cpu_seconds", "grpo_cpu_seconds",
                                      "params_sha256")})
        row["total_seconds"] = r["total_seconds"] + (r["sft_seconds"] if r["sft_cached"] else 0.0)
        met = row["grpo_seconds"] <= targets["grpo_seconds"] and row["total_seconds"] <= targets["command_seconds"]
    else:
        row.update({k: r[k] for k in ("n_eval", "p_value", "load_seconds", "train_seconds", "eval_seconds")})
        met = r["p_value"] < targets["p_value_below"] and row["command_seconds"] <= targets["command_seconds"]
    if not row["shuffle_rewards"]:
        row["meets_targets"] = met and gain >= targets["gain"]
    return row


def git_commit() -> str | None:
    """The commit the runs were made at, marked ``+dirty`` when the work tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "minigrpo"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str | None:
    """The CPU's model name (Linux), since the digits of a run depend on the CPU family."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=sorted(TARGETS), help="the CLI command to run")
    parser.add_argument("--out", default=None, help="summary JSON (default benchmarks/results/COMMAND_headline.json)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per run (1 on a machine whose cores other jobs share)")
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/{args.command.replace('-', '_')}_headline.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, commit = [], git_commit()
    for name, seed, extra in RUNS:
        result = run_cli(args.command, name, seed, extra, out.parent, args.threads)
        rows.append(summarise(args.command, name, seed, result))
        print(json.dumps(rows[-1]))
    load = os.getloadavg()
    pins = {k: os.environ.get(k, v if args.command == "arithmetic" else None) for k, v in PINNED_CPU_NUMERICS.items()}
    summary = {"runs": rows, "command": f"python benchmarks/headline.py {args.command}", "commit": commit,
               "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
               "cpu_model": cpu_model(), "numerics_pins": pins, "load_average_at_end": load,
               "targets": TARGETS[args.command]}
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
