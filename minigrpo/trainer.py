"""The GRPO training loop: one config dataclass and one trainer, for any causal LM.

The objective it minimises::

    L_GRPO(θ) = E_{q~P(Q), {o_i}~π_θold} [ L_PG(·|θ) + β·L_KL(·,θ,θ_ref) + α·L_Entropy(·,θ) ]

Each step: draw prompts q, roll out G completions each (``minigrpo.rollout``), score them with
weighted reward functions, turn rewards into group-relative advantages
(``minigrpo.group_advantages``), then take μ passes of ``minigrpo.grpo_loss`` over the batch
with AdamW.  Greedy held-out accuracy (``minigrpo.evaluation``) is measured before training,
every ``eval_every`` steps and at the end.

Under ``torchrun`` (``init_distributed``) each rank samples its share of the prompts,
gradients are all-reduced by DistributedDataParallel, metrics are averaged over ranks and rank
0 writes checkpoints.

    trainer = GRPOTrainer(model, tokenizer, train_examples, eval_examples, GRPOConfig())
    trainer.train()
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import numbers
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minigrpo.advantages import BASELINES, SCALES, group_advantages
from minigrpo.evaluation import EvalResult, evaluate
from minigrpo.losses import KL_ESTIMATORS, LOSS_TYPES, RATIO_LEVELS, SURROGATES, grpo_loss
from minigrpo.metrics import METRICS, REDUCE_OVER_UPDATES, MetricLog, reduce_updates
from minigrpo.models import is_lora, peak_memory, reference_model
from minigrpo.rewards import exact_match_reward
from minigrpo.rollout import Rollout, completion_logprobs, concat_rollouts, model_device, rollout, select_groups, unwrap

RewardFunc = Callable[[str, str], float]
"""r(completion, answer) -> float"""

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class GRPOConfig:
    """Every GRPO hyperparameter, its default and what it means (defaults: the tiny world).
    Every value is checked when the config is built."""

    # --- the expectation: prompts q ~ P(Q) and groups {o_i} ~ π_θold(O|q)
    steps: int = 100
    """number of GRPO steps (one rollout + its updates each); the schedule's horizon"""
    prompts_per_step: int = 16
    """P, prompts q per step, summed over all ranks; typical 8–64"""
    group_size: int = 8
    """G, completions sampled per prompt; typical 4–16"""
    temperature: float = 1.0
    """τ: completions are drawn from softmax(logits / τ), and every log-prob (ratio, KL, entropy) is of that distribution; 0.6–1.0"""
    max_new_tokens: int = 4
    """L_max, the longest completion ``|o_i|`` in tokens (EOS included); also Dr. GRPO's constant ``max_len``"""

    # --- rewards and advantages
    reward_funcs: tuple[RewardFunc, ...] = (exact_match_reward,)
    """the reward functions r_k(completion, answer)"""
    reward_weights: tuple[float, ...] = (1.0,)
    """w_k, the reward is r = Σ_k w_k·r_k; one weight per reward function"""
    accuracy_reward: RewardFunc = exact_match_reward
    """the reward function whose value 1.0 counts as correct in held-out evaluation"""
    shuffle_rewards: bool = False
    """the control: permute rewards at random within the batch, cutting them from completions"""
    advantage_scale: str = "group"
    """Â's denominator (``scale`` of ``group_advantages``): "group" (std of the group), "batch" (std of the batch), "none" (Dr. GRPO)"""
    normalize_each_reward: bool = False
    """with several reward functions: normalise each within its group, then sum w_k·Â_k, instead of normalising the sum Σ_k w_k·r_k"""
    advantage_baseline: str = "mean"
    """b_i, subtracted from r_i (``baseline`` of ``group_advantages``): "mean" of the group (GRPO, r_i included) or "leave_one_out" (RLOO: the other G − 1)"""
    overlong_cache: int = 0
    """L_cache of DAPO's soft overlong punishment: past max_new_tokens − L_cache tokens the reward falls linearly, by 1 at the limit; 0: off"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal and roll out more prompts until the step has its prompts_per_step groups"""
    max_sampling_rounds: int = 4
    """the most rollouts one step draws with dynamic_sampling; after them it trains on the groups it has (all of the first rollout if none has signal)"""

    # --- the loss L_PG + β·L_KL − α·H
    num_updates: int = 1
    """μ, optimisation passes over each rollout; 1–4 (μ = 1 with one mini-batch: ρ ≡ 1, no clipping happens)"""
    num_minibatches: int = 1
    """mini-batches per pass, one optimiser step each; 1–8"""
    beta: float = 0.04
    """β, weight of the KL loss to the frozen reference; 0–0.1 (0: no reference model kept)"""
    alpha: float = 0.0
    """α, weight of the entropy bonus (minimising −α·H raises entropy); 0–1e-3"""
    eps_low: float = 0.2
    """ε_low, the ratio is clipped below at 1 − ε_low; 0.1–0.3"""
    eps_high: float | None = None
    """ε_high, clipped above at 1 + ε_high; None means ε_low (DAPO's clip-higher: 0.28)"""
    loss_type: str = "grpo"
    """token aggregation: "grpo" (per-sequence mean), "dapo" (token mean), "dr_grpo" (÷ N·max_new_tokens, N sequences in the mini-batch)"""
    ratio_level: str = "token"
    """"token": ρ per token (GRPO); "sequence": one length-normalised ρ per completion (GSPO)"""
    kl_estimator: str = "k3"
    """Schulman's estimator of KL(π_θ‖π_ref) per token: "k1", "k2" or "k3" (the paper's)"""
    kl_bias_correction: bool = False
    """weight each token's KL estimate by its ratio ρ (DeepSeek-V3.2; TRL's use_bias_correction_kl): its gradient becomes the reverse KL's"""
    surrogate: str = "clip"
    """the per-token policy loss: "clip" (PPO/GRPO) or "cispo" (MiniMax-M1: a capped, stop-gradient weight ρ ≤ 1 + ε_high; every token keeps its gradient)"""
    mask_truncated: bool = False
    """overlong filtering (DAPO): completions cut at max_new_tokens, with no EOS, are masked out of the loss"""

    # --- the optimiser (AdamW)
    lr: float = 1e-4
    """η, peak learning rate; tiny model 3e-5–2e-4, 0.5B model with LoRA 1e-5–1e-4, full fine-tuning 1e-6–5e-6"""
    lr_schedule: str = "constant"
    """after warm-up: "constant", "linear" or "cosine" decay to 0 at ``steps``"""
    warmup_steps: int = 0
    """steps of linear learning-rate warm-up from 0; 0–10% of steps"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay; 0–0.1"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm to this (> 0); None: no clipping (the norm is still logged)"""

    # --- evaluation and bookkeeping
    eval_every: int = 25
    """greedy held-out evaluation every this many steps (and before the first, and at the end); 0: before and at the end only"""
    eval_size: int = 500
    """number of held-out problems evaluated (the first ones of the held-out list)"""
    eval_max_new_tokens: int | None = None
    """token limit of evaluation's greedy completions; None: ``max_new_tokens``"""
    eval_batch_size: int = 512
    """prompts per greedy generation call during evaluation"""
    rows_per_pass: int | None = None
    """sequences per no-grad scoring pass (old and reference log-probs); None: all N at once"""
    shared_prefill: bool = False
    """run each prompt once per group and copy its KV cache to its G rows, in sampling, scoring and (with one
    mini-batch and no gradient checkpointing) the update's forward pass: the same function, far less compute
    for long prompts (``rollout.prefix_cache``)"""
    checkpoint_every: int = 0
    """write a checkpoint every this many steps (and at the end) when a directory is given"""
    seed: int = 0
    """seeds prompt sampling, generation and mini-batch order (rank r uses seed + r)"""

    def __post_init__(self):
        self.reward_funcs, self.reward_weights = tuple(self.reward_funcs), tuple(self.reward_weights)
        if not self.reward_funcs or not all(callable(f) for f in (*self.reward_funcs, self.accuracy_reward)):
            raise ValueError("reward_funcs and accuracy_reward must be callables r(completion, answer)")
        if len(self.reward_funcs) != len(self.reward_weights):
            raise ValueError("reward_funcs and reward_weights must have the same length")
        if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"reward_weights must be finite numbers, got {self.reward_weights!r}")
        for name, choices in (("advantage_scale", SCALES), ("advantage_baseline", BASELINES), ("loss_type", LOSS_TYPES),
                              ("ratio_level", RATIO_LEVELS), ("kl_estimator", KL_ESTIMATORS), ("surrogate", SURROGATES),
                              ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("shuffle_rewards", "dynamic_sampling", "kl_bias_correction", "mask_truncated", "shared_prefill",
                     "normalize_each_reward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "num_updates", "num_minibatches",
                     "eval_size", "eval_batch_size", "eval_max_new_tokens", "rows_per_pass", "max_sampling_rounds"):
            check_number(self, name, int, low=1, optional=name in ("eval_max_new_tokens", "rows_per_pass"))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            check_number(self, name, int, low=0)
        check_number(self, "overlong_cache", int, low=0, high=self.max_new_tokens)
        if self.advantage_baseline == "leave_one_out" and self.group_size < 2:
            raise ValueError("advantage_baseline='leave_one_out' needs group_size >= 2")
        if self.surrogate == "cispo" and self.ratio_level != "token":
            raise ValueError("surrogate='cispo' needs ratio_level='token'")
        for name in ("beta", "alpha", "weight_decay", "eps_high"):
            check_number(self, name, float, low=0, optional=name == "eps_high")
        check_number(self, "eps_low", float, low=0, high=1)
        for name in ("temperature", "lr", "max_grad_norm"):  # a norm of 0 would zero every gradient
            check_number(self, name, float, low=0, strict=True, optional=name == "max_grad_norm")
        if (self.prompts_per_step * self.group_size) % self.num_minibatches:
            raise ValueError(f"num_minibatches={self.num_minibatches} must divide prompts_per_step·group_size = "
                             f"{self.prompts_per_step * self.group_size} sequences")
        names = [f.__name__ for f in self.reward_funcs]
        clashes = [n for n in names if names.count(n) > 1 or f"reward_{n}" in METRICS]
        if clashes:  # each is logged as reward_<name>: the names must be distinct and new
            raise ValueError(f"reward_funcs need distinct __name__s that are not logged metrics, got {clashes}")

    @property
    def eval_tokens(self) -> int:
        """The token limit evaluation uses."""
        return self.eval_max_new_tokens or self.max_new_tokens

    def to_dict(self) -> dict:
        """The config as JSON-ready values; reward functions by name."""
        values = dataclasses.asdict(self)
        values["reward_funcs"] = [f.__name__ for f in self.reward_funcs]
        values["accuracy_reward"] = self.accuracy_reward.__name__
        return values


def check_number(config, name: str, kind: type, low: float, high: float = math.inf,
                  strict: bool = False, optional: bool = False) -> None:
    """``config.name`` is a finite ``kind`` (int, or float accepting ints) in [low, high), or
    (low, high) when ``strict``; None allowed when ``optional``."""
    value = getattr(config, name)
    if value is None and optional:
        return
    allowed = numbers.Integral if kind is int else numbers.Real
    ok = isinstance(value, allowed) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if strict else low <= value) or not value < high:
        bounds = f"{'(' if strict else '['}{low}, {high})"
        raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'} in {bounds}, got {value!r}")


# ---------------------------------------------------------------- small pieces


def compute_rewards(
    completions: list[str], answers: list[str], reward_funcs, reward_weights
) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward parts r_k(o_i, answer_i), shape (K, N), one row per reward function, and
    each function's batch mean as ``reward_<name>``; the reward is r_i = Σ_k w_k·r_k (``combine``)."""
    parts = torch.tensor([[float(func(c, a)) for c, a in zip(completions, answers)] for func in reward_funcs])
    parts = parts.view(len(reward_funcs), len(completions))  # (K, N), also when N = 0
    return parts, {f"reward_{func.__name__}": row.mean().item() for func, row in zip(reward_funcs, parts)}


def combine(parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """r_i = Σ_k w_k·r_{k,i}: (K, N) parts and (K,) weights to the (N,) rewards."""
    return weights @ parts


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment for completions of ``lengths`` tokens, (N,); with ℓ a
    completion's length::

        R_length(ℓ) = 0                                if ℓ ≤ L_max − L_cache
                      ((L_max − L_cache) − ℓ) / L_cache  if L_max − L_cache < ℓ ≤ L_max

    so a completion that reaches the limit L_max (``max_len``) loses 1.  ``cache`` = L_cache > 0.
    """
    return ((max_len - cache) - lengths.float()).clamp(max=0) / cache


def live_groups(rewards: torch.Tensor, group_size: int) -> list[int]:
    """The groups whose rewards are not all equal (the ones with a learning signal)."""
    groups = rewards.view(-1, group_size)  # (P, G)
    return (groups.max(dim=1).values != groups.min(dim=1).values).nonzero().flatten().tolist()


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (advantage 0: no learning signal)."""
    groups = rewards.view(-1, group_size)  # (P, G)
    return (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW in its fused form: one kernel per step, on the CPU as on a GPU.

    Fused also makes CPU runs reproducible across CPU vendors: its √v̂ is the processor's
    correctly rounded square root, where the unfused step calls MKL's vector maths, whose
    last bits differ between Intel and AMD processors."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def lr_lambda(config: GRPOConfig):
    """The multiplier of ``config.lr`` at each step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def init_distributed() -> None:
    """Join the process group when launched by torchrun with more than one process: NCCL with
    one GPU per rank (``cuda`` then means ``cuda:LOCAL_RANK``), gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` from torch.distributed when initialised, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Each metric over ranks: the mean over the ranks where it is not ``None`` (a rank whose
    batch had no Â > 0 has no ``completion_tokens_pos_adv``), but ``REDUCE_OVER_UPDATES``'
    extremes (``ratio_min``, ``ratio_max``) by min and max; ``None`` where no rank has a value.
    Every rank sends every key, so the collectives match (identity without torch.distributed)."""
    _, world_size = dist_info()
    if world_size == 1:
        return metrics
    out = dict(metrics)
    keys = sorted(metrics)
    ops = {min: dist.ReduceOp.MIN, max: dist.ReduceOp.MAX}
    device = _dist_device()
    for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.SUM):
        group = [k for k in keys if ops.get(REDUCE_OVER_UPDATES.get(k), dist.ReduceOp.SUM) == op]
        if not group:
            continue
        missing = {dist.ReduceOp.MIN: math.inf, dist.ReduceOp.MAX: -math.inf, dist.ReduceOp.SUM: 0.0}[op]
        values = torch.tensor([missing if metrics[k] is None else float(metrics[k]) for k in group],
                              dtype=torch.float64, device=device)
        counts = torch.tensor([float(metrics[k] is not None) for k in group], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=op)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        if op == dist.ReduceOp.SUM:
            values = values / counts.clamp(min=1)
        out.update((k, v if c > 0 else None) for k, v, c in zip(group, values.tolist(), counts.tolist()))
    return out


def _dist_device() -> torch.device:
    """Where collectives' tensors must live: the rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def params_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over (name, float32 bytes) of every parameter, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, param in unwrap(model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trl_grpo_kwargs(config: GRPOConfig) -> dict:
    """The same hyperparameters as keyword arguments of TRL's ``trl.GRPOConfig`` (TRL 1.16).

    minigrpo's "dapo" (token mean of the mini-batch) is TRL's "bnpo"; TRL's own "dapo" divides
    by the tokens of the whole generation batch.  CISPO is TRL's ``loss_type="cispo"``, whose
    token mean is over the generation batch too and whose ``epsilon_high`` is the cap on the
    weight itself, 1 + ε_high: it matches minigrpo's cispo with "dapo" and one mini-batch.  A
    TRL step is one optimiser step, so step counts are multiplied by the updates per rollout.
    TRL has no counterpart for α > 0, the k1/k2 estimators, shuffled rewards, the
    leave-one-out baseline, dynamic sampling, per-reward normalisation or the overlong penalty
    (TRL has it as a reward function, ``trl.rewards.get_soft_overlong_punishment``): those raise
    ``ValueError``.
    """
    unsupported = dict(alpha=config.alpha != 0, kl_estimator=config.kl_estimator != "k3",
                       shuffle_rewards=config.shuffle_rewards, advantage_baseline=config.advantage_baseline != "mean",
                       dynamic_sampling=config.dynamic_sampling, overlong_cache=config.overlong_cache > 0,
                       normalize_each_reward=config.normalize_each_reward)
    if any(unsupported.values()):
        raise ValueError(f"TRL has no counterpart for {[k for k, v in unsupported.items() if v]}")
    n = config.prompts_per_step * config.group_size  # sequences per rollout
    updates = config.num_updates * config.num_minibatches
    eps_high = config.eps_low if config.eps_high is None else config.eps_high
    if config.surrogate == "cispo":
        if config.loss_type != "dapo" or config.num_minibatches != 1:
            raise ValueError("TRL's cispo is minigrpo's cispo with loss_type='dapo' and one mini-batch")
        loss_type, epsilon_high = "cispo", 1 + eps_high
    else:
        loss_type, epsilon_high = {"dapo": "bnpo"}.get(config.loss_type, config.loss_type), eps_high
    schedule = "constant_with_warmup" if config.lr_schedule == "constant" and config.warmup_steps else config.lr_schedule
    return dict(
        seed=config.seed, max_steps=config.steps * updates, num_generations=config.group_size,
        generation_batch_size=n, per_device_train_batch_size=n // config.num_minibatches,
        gradient_accumulation_steps=1, num_iterations=config.num_updates,
        max_completion_length=config.max_new_tokens, temperature=config.temperature,
        top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        beta=config.beta, use_bias_correction_kl=config.kl_bias_correction, epsilon=config.eps_low,
        epsilon_high=epsilon_high, loss_type=loss_type, mask_truncated_completions=config.mask_truncated,
        importance_sampling_level=config.ratio_level, scale_rewards=config.advantage_scale,
        reward_weights=list(config.reward_weights), learning_rate=config.lr, lr_scheduler_type=schedule,
        warmup_steps=config.warmup_steps * updates, weight_decay=config.weight_decay,
        max_grad_norm=0.0 if config.max_grad_norm is None else config.max_grad_norm,
    )


# ---------------------------------------------------------------- the trainer


class GRPOTrainer:
    """GRPO on a causal LM: ``train()`` runs ``config.steps`` steps; ``history`` holds one
    ``MetricLog`` per step and ``evals`` one ``EvalResult`` per evaluation.

    ``train_examples`` / ``eval_examples`` are lists of ``{"prompt", "answer"}``.  The reference
    model π_ref (kept when β > 0) is ``models.reference_model(model)``: the LoRA policy with its
    adapter switched off, else a frozen copy of ``model`` as given.  The trainer draws its random
    numbers from its own generator state, seeded by ``config.seed`` (+ rank), and leaves the
    global RNGs as they were.
    """

    def __init__(self, model, tokenizer, train_examples, eval_examples, config: GRPOConfig):
        self.config = config
        self.tokenizer = tokenizer
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)[: config.eval_size]
        self.rank, self.world_size = dist_info()
        if config.prompts_per_step % self.world_size:
            raise ValueError(f"prompts_per_step={config.prompts_per_step} is not divisible by {self.world_size} ranks")
        if (config.prompts_per_step // self.world_size * config.group_size) % config.num_minibatches:
            raise ValueError(f"num_minibatches={config.num_minibatches} must divide each rank's "
                             f"{config.prompts_per_step // self.world_size * config.group_size} sequences")
        self.model = model
        self.device = model_device(model)
        self.policy = model  # what the loss runs: DDP broadcasts rank 0's parameters to every rank
        if self.world_size > 1:
            self.policy = torch.nn.parallel.DistributedDataParallel(model)
        self.ref_model = reference_model(model) if config.beta > 0 else None
        self.owns_ref = self.ref_model is not None and not is_lora(model)  # a copy: it goes in checkpoints
        self.prompt_rng = random.Random(config.seed + self.rank)
        self.rng_state = self._seeded_rng_state(config.seed + self.rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.step = 0
        self.history: list[MetricLog] = []
        self.evals: list[EvalResult] = []

    # --- randomness of its own

    def _seeded_rng_state(self, seed: int) -> dict:
        state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.Generator(self.device).manual_seed(seed).get_state()
        return state

    @contextlib.contextmanager
    def own_rng(self):
        """Inside the block torch's global RNGs (CPU, and the model's GPU) run from the trainer's
        state, which the block then advances; outside, they are as the caller left them."""
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self.rng_state["cpu"])
            if cuda:
                torch.cuda.set_rng_state(self.rng_state["cuda"], self.device)
            yield
            self.rng_state["cpu"] = torch.get_rng_state()
            if cuda:
                self.rng_state["cuda"] = torch.cuda.get_rng_state(self.device)

    # --- one step, in pieces

    @property
    def single_update(self) -> bool:
        """True for one pass (μ = 1) over one mini-batch.  That update runs at θ = θ_old, so the
        rollout skips the π_θold pass and the update's own log-probs, detached, stand in for it."""
        return self.config.num_updates == 1 and self.config.num_minibatches == 1

    def sample_prompts(self) -> list[dict[str, str]]:
        """This rank's share of the step's prompts, drawn uniformly with replacement."""
        k = self.config.prompts_per_step // self.world_size
        return [self.train_examples[self.prompt_rng.randrange(len(self.train_examples))] for _ in range(k)]

    def sample_groups(self, examples) -> Rollout:
        """G completions per example from the current policy, scored (``minigrpo.rollout``)."""
        c = self.config
        return rollout(
            self.model, self.tokenizer, examples, group_size=c.group_size, temperature=c.temperature,
            max_new_tokens=c.max_new_tokens, ref_model=self.ref_model, score_old=not self.single_update,
            rows_per_pass=c.rows_per_pass, shared_prefill=c.shared_prefill,
        )

    def rewarded_groups(self) -> tuple[Rollout, torch.Tensor, torch.Tensor, dict[str, float]]:
        """One rollout of this rank's prompts with its reward parts (K, N) and their weights (K,):
        the reward functions, plus DAPO's soft overlong penalty (weight 1) when ``overlong_cache``
        > 0; and each part's mean."""
        c = self.config
        batch = self.sample_groups(self.sample_prompts())
        parts, means = compute_rewards(batch.completions, batch.answers, c.reward_funcs, c.reward_weights)
        weights = torch.tensor(c.reward_weights, dtype=parts.dtype)
        if c.overlong_cache:
            penalty = soft_overlong_penalty(batch.completion_mask.sum(-1).cpu(), c.max_new_tokens, c.overlong_cache)
            parts, weights = torch.cat([parts, penalty[None]]), torch.cat([weights, weights.new_ones(1)])
            means["reward_overlong_penalty"] = penalty.mean().item()
        return batch, parts, weights, means

    def sample_batch(self) -> tuple[Rollout, torch.Tensor, torch.Tensor, MetricLog]:
        """The step's training batch, its reward parts (K, N) and weights (K,), and the sampling
        metrics.

        Without ``dynamic_sampling`` that is one rollout.  With it, groups whose rewards are all
        equal are dropped and more prompts are rolled out, up to ``max_sampling_rounds``
        rollouts, until the batch has ``prompts_per_step`` (per rank) groups with signal.  The
        reward metrics are over every completion sampled, the batch's or not."""
        c = self.config
        batch, parts, weights, means = self.rewarded_groups()
        sampled = [(batch, parts, means)]
        if c.dynamic_sampling:
            want = c.prompts_per_step // self.world_size
            live = [live_groups(combine(parts, weights), c.group_size)]  # per rollout, its groups with signal
            while sum(map(len, live)) < want and len(sampled) < c.max_sampling_rounds:
                more, more_parts, _, more_means = self.rewarded_groups()
                sampled.append((more, more_parts, more_means))
                live.append(live_groups(combine(more_parts, weights), c.group_size))
            chosen, chosen_parts, total = [], [], 0
            for (part, part_rewards, _), groups in zip(sampled, live):
                groups = groups[: want - total]
                total += len(groups)
                if groups:
                    chosen.append(select_groups(part, groups, c.group_size))
                    by_group = part_rewards.view(len(part_rewards), -1, c.group_size)  # (K, P, G)
                    chosen_parts.append(by_group[:, groups].flatten(1))
            if chosen:  # else no group had signal: train on the first rollout (only the KL moves)
                batch, parts = concat_rollouts(chosen, self.tokenizer.pad_token_id), torch.cat(chosen_parts, dim=1)
        every = combine(torch.cat([p for _, p, _ in sampled], dim=1), weights)  # (rounds · N,)
        metrics = MetricLog(
            reward_mean=every.mean().item(), reward_std=every.std().item(),
            zero_std_frac=zero_std_fraction(every, c.group_size), groups_sampled=every.numel() // c.group_size,
            truncated_frac=torch.cat([b.truncated.float().cpu() for b, _, _ in sampled]).mean().item(),
        )
        metrics.update({k: sum(m[k] for *_, m in sampled) / len(sampled) for k in means})
        return batch, parts, weights, metrics

    def advantages(self, parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Â (N,) from the reward parts: group advantages of the weighted sum Σ_k w_k·r_k, or,
        with ``normalize_each_reward``, Σ_k w_k·Â(r_k), each part normalised in its group first."""
        c = self.config

        def adv(r):
            return group_advantages(r, c.group_size, scale=c.advantage_scale, baseline=c.advantage_baseline)

        if c.normalize_each_reward:
            return sum(w * adv(r) for w, r in zip(weights.tolist(), parts))
        return adv(combine(parts, weights))

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward, clip, AdamW step; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        return grad_norm.item()

    def policy_updates(self, batch: Rollout, advantages: torch.Tensor) -> dict[str, float | None]:
        """μ passes over the rollout in ``num_minibatches`` shuffled mini-batches, one AdamW step
        each; ``grpo_loss`` on each, with π_θold from the rollout (or, when the rollout has none,
        ``single_update``, this pass's own log-probs detached: ρ = exp(log π_θ − sg[log π_θ]) ≡ 1,
        gradient intact)."""
        c = self.config
        n = advantages.numel()
        records = []
        was_training = self.model.training
        self.model.train()  # gradient checkpointing, when on, acts in training mode only
        # whole groups in order (one mini-batch) can share each prompt's forward pass, unless
        # gradient checkpointing (which keeps no KV cache) is on
        checkpointing = getattr(unwrap(self.model), "is_activation_checkpointing", False)
        group = c.group_size if c.shared_prefill and c.num_minibatches == 1 and not checkpointing else 1
        for _ in range(c.num_updates):
            order = torch.randperm(n) if c.num_minibatches > 1 else torch.arange(n)
            for rows in order.to(self.device).chunk(c.num_minibatches):
                mask = batch.completion_mask[rows]
                if c.mask_truncated:  # overlong filtering: a completion cut at the limit teaches nothing
                    mask = mask * ~batch.truncated[rows, None]
                logprobs, entropy = completion_logprobs(
                    self.policy, batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                    mask, c.temperature, group,
                )  # (n, T), (n, T)
                old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[rows]
                out = grpo_loss(
                    logprobs, old, advantages[rows], mask,
                    ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[rows],
                    entropy=entropy, beta=c.beta, alpha=c.alpha, eps_low=c.eps_low, eps_high=c.eps_high,
                    loss_type=c.loss_type, ratio_level=c.ratio_level, kl_estimator=c.kl_estimator,
                    max_len=c.max_new_tokens, surrogate=c.surrogate, kl_bias_correction=c.kl_bias_correction,
                )
                record = MetricLog(
                    loss=out.loss.item(), policy_loss=out.policy_loss.item(),
                    kl=None if out.kl is None else out.kl.item(),  # None: no reference (β = 0)
                    entropy=out.entropy.item(), grad_norm=self.optimizer_step(out.loss),
                )
                record.update(out.metrics)  # a name grpo_loss shares with the above would raise
                if "kl_token_mean" not in record:  # no reference (β = 0): logged as None, like "kl"
                    record["kl_token_mean"] = None
                records.append(record)
        self.model.train(was_training)  # back to the mode generation runs in (eval: KV cache on)
        return reduce_updates(records)

    def train_step(self) -> MetricLog:
        """One GRPO step: rollout → rewards → advantages → μ updates → schedule step."""
        c = self.config
        start = time.perf_counter()
        metrics = MetricLog()
        with self.own_rng(), peak_memory(self.device) as memory:
            batch, parts, weights, sampling = self.sample_batch()
            if c.shuffle_rewards:  # the control: every part's values, permuted together
                parts = parts[:, torch.randperm(parts.shape[1])]
            advantages = self.advantages(parts, weights).to(self.device)  # (N,)
            metrics.update(sampling, lr=self.scheduler.get_last_lr()[0])
            metrics.update(self.policy_updates(batch, advantages))
            self.scheduler.step()
        metrics["step_seconds"] = time.perf_counter() - start
        if memory["peak_gib"] is not None:
            metrics["peak_memory_gib"] = memory["peak_gib"]
        metrics = MetricLog(mean_over_ranks(metrics))
        self.step += 1
        metrics["step"] = self.step
        self.history.append(metrics)
        return metrics

    # --- evaluation

    def evaluate(self) -> EvalResult:
        """Greedy held-out accuracy (``minigrpo.evaluation.evaluate`` scored by
        ``accuracy_reward``), appended to ``evals``.  Under DDP each rank evaluates every
        ``world_size``-th problem and the results are gathered back into the examples' order,
        so every rank holds the whole evaluation (counts, completions, per-problem verdicts)."""
        c = self.config
        mine = self.eval_examples[self.rank :: self.world_size]
        result = evaluate(self.model, self.tokenizer, mine, c.accuracy_reward, max_new_tokens=c.eval_tokens,
                          batch_size=c.eval_batch_size, step=self.step)
        if self.world_size > 1:
            shares = [None] * self.world_size
            dist.all_gather_object(shares, (result.completions, result.correct_mask, result.truncated_frac * result.n))
            n = len(self.eval_examples)
            completions, correct_mask = [None] * n, [False] * n
            for rank, (texts, verdicts, _) in enumerate(shares):
                completions[rank :: self.world_size] = texts
                correct_mask[rank :: self.world_size] = verdicts
            truncated = sum(share[2] for share in shares)
            result = EvalResult(step=self.step, n=n, correct=sum(correct_mask), truncated_frac=truncated / max(n, 1),
                                completions=completions, correct_mask=correct_mask)
        self.evals.append(result)
        return result

    # --- the loop

    def due_for_eval(self) -> bool:
        """Evaluate every ``eval_every`` steps and after the last step, whatever ``until`` is
        (so a run stopped and resumed evaluates at the same steps as one run straight)."""
        c = self.config
        return self.step == c.steps or bool(c.eval_every) and self.step % c.eval_every == 0

    def train(self, until: int | None = None, checkpoint_dir: str | Path | None = None, progress: bool = True):
        """Run steps up to ``until`` (default ``config.steps``; stop earlier to resume later),
        evaluating at step 0, every ``eval_every`` steps and at the end, and checkpointing to
        ``checkpoint_dir`` every ``checkpoint_every`` steps and when stopping."""
        c = self.config
        until = c.steps if until is None else until
        if not self.evals:
            self.evaluate()
        bar = tqdm(total=until, initial=self.step, desc="GRPO", disable=not progress or self.rank != 0)
        while self.step < until:
            metrics = self.train_step()
            if self.due_for_eval():
                self.evaluate()
            if checkpoint_dir and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{self.evals[-1].accuracy:.3f}")
        bar.close()
        if checkpoint_dir:
            self.save_checkpoint(checkpoint_dir)
        return self.history

    # --- checkpoints

    def save_checkpoint(self, directory: str | Path) -> None:
        """Parameters (and the trainer's own reference copy) as safetensors; optimizer,
        scheduler, step, history, evaluations and config in ``trainer_state.pt``; each rank's
        random state in ``rng_rank{r}.pt``.  Everything loads with ``weights_only=True``."""
        directory = Path(directory)
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_model(self.model, str(directory / "model.safetensors"))
            if self.owns_ref:
                safetensors.torch.save_model(self.ref_model, str(directory / "ref_model.safetensors"))
            torch.save({
                "step": self.step, "history": [dict(h) for h in self.history],
                "evals": [dataclasses.asdict(e) for e in self.evals], "config": self.config.to_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            }, directory / "trainer_state.pt")
        if self.world_size > 1:
            dist.barrier()
        torch.save({"torch": self.rng_state, "prompts": self.prompt_rng.getstate()}, directory / f"rng_rank{self.rank}.pt")
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore everything ``save_checkpoint`` wrote; training then continues exactly."""
        directory = Path(directory)
        safetensors.torch.load_model(self.model, str(directory / "model.safetensors"), device=str(self.device))
        if self.owns_ref:
            safetensors.torch.load_model(self.ref_model, str(directory / "ref_model.safetensors"), device=str(self.device))
        state = torch.load(directory / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = [MetricLog(h) for h in state["history"]]
        self.evals = [EvalResult(**e) for e in state["evals"]]
        rng = torch.load(directory / f"rng_rank{self.rank}.pt", weights_only=True)
        self.rng_state = rng["torch"]
        self.prompt_rng.setstate(rng["prompts"])


def has_checkpoint(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / "trainer_state.pt").exists()
