"""The chapters' sweeps: many short GRPO runs over three seeds, written to one JSON each.

    python benchmarks/sweeps.py variants   # chapter 8 -> benchmarks/results/sweep_variants.json
    python benchmarks/sweeps.py dials      # chapter 7 -> benchmarks/results/sweep_dials.json
    python benchmarks/sweeps.py sampler    # chapter 9 -> benchmarks/results/sweep_sampler.json

``variants``: the GRPO family on the *padded-answer* task.  It is chapter 7's two-digit
addition with a teacher that writes half of its answers with one to three leading zeros
(``WarmupConfig(padding=0.5)``: "068") and a reward that scores a completion by its value
(``number_match_reward``), so completions vary in length without changing their correctness,
which is where the aggregations differ.  ``max_new_tokens`` is 6, one short of the longest
padded answer and its end-of-sequence token, so some completions are cut at the limit: what
overlong filtering and the soft overlong penalty act on.

``dials``: chapter 7's own task and defaults, one knob changed per run: the learning rate,
gradient clipping, the sampling temperature, and a second, hackable reward (a "format" reward
paying for three-digit answers, chapter 11's boxed-answer reward in miniature) weighed two ways
and normalised two ways.

``sampler``: chapter 7's task and defaults with a sampler that is not the trainer: a bfloat16
copy of the policy synced after every update, or float32 weights 1, 2 or 4 updates old
(``rollout_lag``), each uncorrected and with the four rollout corrections of ``grpo_loss``
(TRL's ``vllm_importance_sampling_mode``s, C_max = 3), and lag 4 with DeepSeek-V3.2's off-policy
sequence mask alone (δ_off = 0.5, TRL's example, and 0.1).

Every seed warms up its own base model once (cached under ``runs/sweep-warmup``); each run of
that seed starts from a fresh copy.  The runs use the libraries' default CPU code (not the
numerics pins of ``conftest.py``), so their digits depend on the CPU; the JSON records it.
Per run the JSON keeps the per-step metrics the chapters plot, the held-out evaluations, the
lengths of the final greedy completions, and the seconds it took.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from minigrpo.arithmetic import WarmupConfig, numerics_pins, warmup_model
from minigrpo.config import GRPOConfig
from minigrpo.data import arithmetic_examples
from minigrpo.rewards import exact_match_reward, number_match_reward
from minigrpo.trainer import GRPOTrainer

SEEDS = (0, 1, 2)
WARMUP_CACHE = Path("runs/sweep-warmup")
KEPT = ("reward_mean", "completion_tokens_mean", "completion_tokens_pos_adv", "completion_tokens_neg_adv",
        "truncated_frac", "clip_frac", "zero_std_frac", "groups_sampled", "kl_token_mean", "entropy_token_mean",
        "grad_norm", "step_seconds", "sampling_logp_difference_mean", "sampling_logp_difference_max",
        "sampling_seq_log_ratio_std", "importance_sampling_ratio_min", "importance_sampling_ratio_mean",
        "importance_sampling_ratio_max", "importance_sampling_out_of_bounds_frac", "off_policy_masked_frac")
"""the per-step metrics kept in the JSON (the chapters' curves; those a run logs), with every reward_<name> mean"""


def three_digit_reward(completion: str, answer: str) -> float:
    """r = 1 if the completion is exactly three digits, whatever they are: a format reward that
    a wrong answer can earn (as a boxed wrong answer earns chapter 11's format reward)."""
    text = completion.strip()
    return 1.0 if len(text) == 3 and text.isascii() and text.isdigit() else 0.0


SAMPLERS = {"bf16 sampler": dict(sampler_dtype="bfloat16"), **{f"lag {k}": dict(rollout_lag=k) for k in (1, 2, 4)}}
"""the sampler sweep's samplers that are not the trainer: a bfloat16 copy, and float32 weights k updates old"""
ROLLOUT_CORRECTIONS = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

PADDED = dict(reward_funcs=(number_match_reward,), accuracy_reward=number_match_reward, max_new_tokens=6,
              steps=60, eval_every=20, eval_size=300)
SWEEPS = {
    "variants": {
        "warmup": dict(padding=0.5),
        "base": PADDED,
        "runs": {
            "GRPO": {},
            "beta=0": dict(beta=0.0),
            "beta=10x": dict(beta=0.4),
            "alpha=0.01": dict(alpha=0.01),
            "G=2": dict(group_size=2),
            "G=4": dict(group_size=4),
            "DAPO (token mean)": dict(loss_type="dapo"),
            "Dr. GRPO": dict(loss_type="dr_grpo", advantage_scale="none"),
            "RLOO baseline": dict(advantage_baseline="leave_one_out"),
            "GRPO, mu=2": dict(num_updates=2),
            "eps=0.05, mu=2": dict(eps_low=0.05, num_updates=2),
            "clip-higher, mu=2": dict(eps_high=0.28, num_updates=2),
            "GSPO, mu=2": dict(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, num_updates=2),
            "CISPO, mu=2": dict(surrogate="cispo", loss_type="dapo", eps_high=0.28, num_updates=2),
            "dynamic sampling": dict(dynamic_sampling=True, max_sampling_rounds=4),
            "overlong filtering": dict(mask_truncated=True),
            "soft overlong penalty": dict(overlong_cache=2),
            "shuffled rewards": dict(shuffle_rewards=True),
        },
    },
    "sampler": {
        "warmup": {},
        "base": dict(steps=100, eval_every=25, eval_size=500),
        "runs": {
            "on-policy": {},
            **{f"{sampler}, {mode or 'uncorrected'}": dict(setting, rollout_correction=mode)
               for sampler, setting in SAMPLERS.items() for mode in ROLLOUT_CORRECTIONS},
            **{f"lag 4, off-policy mask δ_off = {delta}": dict(rollout_lag=4, off_policy_mask_threshold=delta)
               for delta in (0.5, 0.1)},
        },
    },
    "dials": {
        "warmup": {},
        "base": dict(steps=100, eval_every=25, eval_size=500),
        "runs": {
            "default": {},
            "lr=3e-5": dict(lr=3e-5),
            "lr=3e-4": dict(lr=3e-4),
            "lr=1e-3": dict(lr=1e-3),
            "no gradient clipping": dict(max_grad_norm=None),
            "temperature 0.7": dict(temperature=0.7),
            "temperature 1.3": dict(temperature=1.3),
            "+ format reward, weight 1": dict(reward_funcs=(exact_match_reward, three_digit_reward),
                                              reward_weights=(1.0, 1.0)),
            "+ format reward, weight 0.3": dict(reward_funcs=(exact_match_reward, three_digit_reward),
                                                reward_weights=(1.0, 0.3)),
            "+ format reward, weight 1, each normalised": dict(
                reward_funcs=(exact_match_reward, three_digit_reward), reward_weights=(1.0, 1.0),
                normalize_each_reward=True),
        },
    },
}


def machine_record() -> dict:
    """Where a benchmark ran: torch, platform, cores, Python, and the numerics pins of
    ``conftest.py`` as this process has them (None: the libraries' default CPU code)."""
    return dict(torch_version=torch.__version__, platform=platform.platform(), cpu_count=os.cpu_count(),
                python=sys.version.split()[0],
                numerics_pins=numerics_pins())


def lengths(result) -> dict:
    """Mean length (characters = tokens here) of the greedy completions, right and wrong."""
    right = [len(c) for c, ok in zip(result.completions, result.correct_mask) if ok]
    wrong = [len(c) for c, ok in zip(result.completions, result.correct_mask) if not ok]
    return {"right": statistics.fmean(right) if right else None, "wrong": statistics.fmean(wrong) if wrong else None}


def by_answer_size(result, held_out) -> dict:
    """Greedy accuracy on the problems whose answer has three digits and on the others, and the
    share of greedy completions that are three characters long."""
    split = {"three_digits": [], "fewer_digits": []}
    for ok, ex in zip(result.correct_mask, held_out):
        split["three_digits" if len(ex["answer"]) == 3 else "fewer_digits"].append(ok)
    out = {f"accuracy_{k}": statistics.fmean(v) if v else None for k, v in split.items()}
    out["three_characters"] = statistics.fmean(len(c.strip()) == 3 for c in result.completions)
    return out


def one_run(base_model, tokenizer, config: GRPOConfig, train, held_out) -> dict:
    """One GRPO run from a copy of the seed's base model: its evaluations, kept metrics, the
    final greedy completions' lengths and its seconds."""
    start = time.perf_counter()
    trainer = GRPOTrainer(copy.deepcopy(base_model), tokenizer, train, held_out, config)
    trainer.train(progress=False)
    out = {
        "evals": [e.summary() for e in trainer.evals],
        "history": [{**{k: h[k] for k in KEPT if k in h}, **{k: v for k, v in h.items() if k.startswith("reward_")}}
                    for h in trainer.history],
        "greedy_lengths_before": lengths(trainer.evals[0]), "greedy_lengths_after": lengths(trainer.evals[-1]),
        "by_answer_size_before": by_answer_size(trainer.evals[0], held_out),
        "by_answer_size_after": by_answer_size(trainer.evals[-1], held_out),
        "seconds": time.perf_counter() - start,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", choices=sorted(SWEEPS))
    parser.add_argument("--out", default=None, help="default benchmarks/results/sweep_<sweep>.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--only", nargs="+", metavar="RUN", default=None,
                        help="run only these runs and put them into the existing --out JSON, keeping the rest")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sweep = SWEEPS[args.sweep]
    out_path = Path(args.out or f"benchmarks/results/sweep_{args.sweep}.json")
    command = f"python benchmarks/sweeps.py {args.sweep}"
    runs = sweep["runs"]
    if args.only:
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            parser.error(f"--only: no run named {unknown} in the {args.sweep} sweep")
        runs = {name: runs[name] for name in args.only}
        result = json.loads(out_path.read_text())
        if result["seeds"] != args.seeds:
            parser.error(f"--only: {out_path} has seeds {result['seeds']}, not {args.seeds}")
        command += " --only " + " ".join(f"'{name}'" for name in args.only)
    else:
        result = {"sweep": args.sweep, "command": command, "seeds": args.seeds, "runs": {}, "warmups": {}}
    start = time.perf_counter()
    for seed in args.seeds:
        warmup = WarmupConfig(seed=seed, **sweep["warmup"])
        base_model, tokenizer, info = warmup_model(warmup, WARMUP_CACHE, progress=False)
        result["warmups"][str(seed)] = {"config": dataclasses.asdict(warmup), "sft_seconds": info["sft_seconds"]}
        base = GRPOConfig(seed=seed, **sweep["base"])
        train = arithmetic_examples(warmup.digits, held_out=False)
        held_out = arithmetic_examples(warmup.digits, held_out=True, size=base.eval_size)
        for name, overrides in runs.items():
            config = dataclasses.replace(base, **overrides)
            run = one_run(base_model, tokenizer, config, train, held_out)
            run["config"] = config.to_dict()
            result["runs"].setdefault(name, {})[str(seed)] = run
            evals = run["evals"]
            print(f"seed {seed} {name:>44}: {evals[0]['accuracy']:.3f} -> {evals[-1]['accuracy']:.3f} "
                  f"({run['seconds']:.0f} s)", flush=True)
    machine = machine_record()
    if args.only:  # the runs added later, each with its command, time and machine
        result.setdefault("added", []).append(dict(command=command, seconds=time.perf_counter() - start, **machine))
    else:
        result.update(total_seconds=time.perf_counter() - start, **machine)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
