"""The GRPO training loop: one config dataclass, small functions composed.

The objective it minimises::

    L_GRPO(θ) = E_{q~P(Q), {o_i}~π_θold} [ L_PG(·|θ) + β·L_KL(·,θ,θ_ref) + α·L_Entropy(·,θ) ]

Each step: draw prompts q, roll out G completions each (``minigrpo.rollout``), score them with
weighted reward functions, turn rewards into group-relative advantages
(``minigrpo.group_advantages``), then take μ passes of ``minigrpo.grpo_loss`` over the batch
(old log-probs from the rollout, so with μ = 1 and one mini-batch the ratio ρ ≡ 1) with AdamW.
Greedy held-out accuracy is measured every ``eval_every`` steps.

Under ``torchrun`` (torch.distributed initialised) each rank samples its share of the prompts,
gradients are all-reduced by DistributedDataParallel, metrics are averaged over ranks and rank
0 writes checkpoints.

Also here: the supervised warm-up that stands in for pre-training (``warmup_model``, cached
on disk by its config), and checkpoints with every RNG state for exact resume.

    trainer = GRPOTrainer(model, tokenizer, train_examples, eval_examples, GRPOConfig())
    trainer.train()
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minigrpo.advantages import group_advantages
from minigrpo.data import warmup_examples
from minigrpo.losses import grpo_loss
from minigrpo.rewards import correctness_reward, exact_match_reward, format_reward
from minigrpo.rollout import Rollout, completion_logprobs, greedy_completions, rollout, tokenize_prompts, unwrap
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer, load_tiny, save_tiny


@dataclass
class GRPOConfig:
    """Every GRPO hyperparameter, its default and what it means (defaults: the tiny world)."""

    # --- the expectation: prompts q ~ P(Q) and groups {o_i} ~ π_θold(O|q)
    steps: int = 100
    """number of GRPO steps (one rollout + its updates each); the schedule's horizon"""
    prompts_per_step: int = 16
    """prompts q per step, summed over all ranks; typical 8–64"""
    group_size: int = 8
    """G, completions sampled per prompt; typical 4–16"""
    temperature: float = 1.0
    """τ: completions are drawn from softmax(logits / τ), and every log-prob (ratio, KL, entropy) is of that distribution; 0.6–1.2"""
    max_new_tokens: int = 4
    """longest completion ``|o_i|`` in tokens (EOS included); also Dr. GRPO's constant max_len"""

    # --- rewards and advantages
    reward_funcs: tuple[str, ...] = ("exact_match",)
    """names of the reward functions r_k(completion, answer), see ``REWARD_FUNCS``"""
    reward_weights: tuple[float, ...] = (1.0,)
    """w_k, the reward is r = Σ_k w_k·r_k; one weight per reward function"""
    accuracy_reward: str = "exact_match"
    """the reward function whose value 1.0 counts as correct in held-out evaluation"""
    shuffle_rewards: bool = False
    """the control: permute rewards at random within the batch, cutting them from completions"""
    advantage_scale: str = "group"
    """Â's denominator: "group" (std of the group), "batch" (std of the batch), "none" (Dr. GRPO)"""

    # --- the loss L_PG + β·L_KL − α·H
    num_updates: int = 1
    """μ, optimisation passes over each rollout; 1–4 (μ = 1: ρ ≡ 1, no clipping happens)"""
    num_minibatches: int = 1
    """mini-batches per pass, one optimiser step each; 1–8"""
    beta: float = 0.04
    """β, weight of the KL loss to the frozen reference; 0–0.1 (0: no reference model kept)"""
    alpha: float = 0.0
    """α, weight of the entropy bonus (minimising −α·H raises entropy); 0–0.01"""
    eps_low: float = 0.2
    """ε_low, the ratio is clipped below at 1 − ε_low; 0.1–0.3"""
    eps_high: float | None = None
    """ε_high, clipped above at 1 + ε_high; None means ε_low (DAPO's clip-higher: 0.28)"""
    loss_type: str = "grpo"
    """token aggregation: "grpo" (per-sequence mean), "dapo" (token mean), "dr_grpo" (÷ G·max_len)"""
    ratio_level: str = "token"
    """"token": ρ per token (GRPO); "sequence": one length-normalised ρ per completion (GSPO)"""
    kl_estimator: str = "k3"
    """Schulman's estimator of KL(π_θ‖π_ref) per token: "k1", "k2" or "k3" (the paper's)"""

    # --- the optimiser (AdamW)
    lr: float = 1e-4
    """η, peak learning rate; tiny model 3e-5–2e-4, 0.5B model with LoRA 1e-5–1e-4"""
    lr_schedule: str = "constant"
    """after warm-up: "constant", "linear" or "cosine" decay to 0 at ``steps``"""
    warmup_steps: int = 0
    """steps of linear learning-rate warm-up from 0; 0–10% of steps"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay; 0–0.1"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm to this; None: no clipping (the norm is still logged)"""

    # --- evaluation and bookkeeping
    eval_every: int = 25
    """greedy held-out evaluation every this many steps (and at the end); 0: only at the end"""
    eval_size: int = 500
    """number of held-out problems evaluated (the first ones of the held-out list)"""
    eval_batch_size: int = 512
    """prompts per greedy generation call during evaluation"""
    checkpoint_every: int = 0
    """write a checkpoint every this many steps (and at the end) when a directory is given"""
    seed: int = 0
    """seeds prompt sampling, generation and mini-batch order (rank r uses seed + r)"""

    def __post_init__(self):
        if len(self.reward_funcs) != len(self.reward_weights):
            raise ValueError("reward_funcs and reward_weights must have the same length")
        for name in (*self.reward_funcs, self.accuracy_reward):
            if name not in REWARD_FUNCS:
                raise ValueError(f"unknown reward function {name!r}; choose from {sorted(REWARD_FUNCS)}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}")
        for name in ("steps", "prompts_per_step", "group_size", "num_updates", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        self.reward_funcs, self.reward_weights = tuple(self.reward_funcs), tuple(self.reward_weights)


def _format_reward(completion: str, answer: str) -> float:
    return format_reward(completion)


REWARD_FUNCS = {
    "exact_match": exact_match_reward,
    "correctness": correctness_reward,
    "format": _format_reward,
}
"""Reward functions by name, each ``(completion, answer) -> float``."""


# ---------------------------------------------------------------- small pieces


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every global RNG state (torch, python, numpy), for exact resume."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` from torch.distributed when initialised, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def compute_rewards(
    completions: list[str], answers: list[str], config: GRPOConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """r_i = Σ_k w_k·r_k(o_i, answer_i), shape (N,), plus each reward function's batch mean."""
    total = torch.zeros(len(completions))
    means = {}
    for name, weight in zip(config.reward_funcs, config.reward_weights):
        values = torch.tensor([REWARD_FUNCS[name](c, a) for c, a in zip(completions, answers)])  # (N,)
        total += weight * values
        means[f"reward_{name}"] = values.mean().item()
    return total, means


def shuffle_within_batch(rewards: torch.Tensor) -> torch.Tensor:
    """The control: the same rewards in a random order, so they say nothing about completions."""
    return rewards[torch.randperm(rewards.numel())]


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (advantage 0: no learning signal)."""
    groups = rewards.view(-1, group_size)  # (P, G)
    return (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()


def mean_of(values: list[float | None]) -> float | None:
    """The mean of the values, None when they are None (a metric that was not computed)."""
    return None if values[0] is None else sum(values) / len(values)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp(min=1)).item()


def params_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over (name, float32 bytes) of every parameter, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, param in unwrap(model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Average each metric over ranks (identity without torch.distributed)."""
    rank, world_size = dist_info()
    if world_size == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if v is not None)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**metrics, **dict(zip(keys, (values / world_size).tolist()))}


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """π_ref: a copy of the model with gradients switched off."""
    ref = copy.deepcopy(unwrap(model))
    ref.requires_grad_(False)
    return ref


# ---------------------------------------------------------------- the trainer


class GRPOTrainer:
    """GRPO on a causal LM: ``train()`` runs ``config.steps`` steps; ``history`` has the metrics.

    ``train_examples`` / ``eval_examples`` are lists of ``{"prompt", "answer"}``.  The
    reference model π_ref is ``ref_model`` when given (e.g. a LoRA policy with its adapter
    disabled), else a frozen copy of ``model`` as given (only kept when β > 0).
    """

    def __init__(self, model, tokenizer, train_examples, eval_examples, config: GRPOConfig, ref_model=None):
        self.config = config
        self.tokenizer = tokenizer
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)[: config.eval_size]
        self.rank, self.world_size = dist_info()
        if config.prompts_per_step % self.world_size:
            raise ValueError(f"prompts_per_step={config.prompts_per_step} is not divisible by {self.world_size} ranks")
        seed_everything(config.seed + self.rank)
        self.prompt_rng = random.Random(config.seed + self.rank)
        self.model = model
        self.policy = model
        if self.world_size > 1:  # DDP broadcasts rank 0's parameters to every rank
            self.policy = torch.nn.parallel.DistributedDataParallel(model)
        self.owns_ref = ref_model is None and config.beta > 0  # then its copy goes in checkpoints
        self.ref_model = None
        if config.beta > 0:
            self.ref_model = ref_model if ref_model is not None else frozen_copy(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.step = 0
        self.history: list[dict[str, float]] = []  # one dict of metrics per step
        self.evals: list[dict[str, float]] = []  # {"step", "accuracy"} per evaluation

    # --- one step, in pieces

    def sample_prompts(self) -> list[dict[str, str]]:
        """This rank's share of the step's prompts, drawn uniformly with replacement."""
        k = self.config.prompts_per_step // self.world_size
        return [self.train_examples[self.prompt_rng.randrange(len(self.train_examples))] for _ in range(k)]

    @property
    def single_update(self) -> bool:
        """True when each rollout gets one pass (μ = 1) over one mini-batch, which runs at θ = θ_old,
        so π_θold needs no forward pass of its own."""
        return self.config.num_updates == 1 and self.config.num_minibatches == 1

    def rollout(self, examples) -> Rollout:
        c = self.config
        return rollout(
            self.model, self.tokenizer, examples, group_size=c.group_size,
            temperature=c.temperature, max_new_tokens=c.max_new_tokens, ref_model=self.ref_model,
            score_old=not self.single_update,
        )

    def loss(self, batch: Rollout, advantages: torch.Tensor, rows: torch.Tensor):
        """``grpo_loss`` on the sequences ``rows`` of the rollout, with the current policy's log-probs.

        A rollout scored without π_θold (``single_update``) gets its old log-probs and entropy
        here, from this pass at θ = θ_old: ρ = exp(log π_θ − sg[log π_θ]) ≡ 1, gradient intact.
        """
        c = self.config
        logprobs, entropy = completion_logprobs(
            self.policy, batch.prompt_ids[rows], batch.prompt_mask[rows],
            batch.completion_ids[rows], batch.completion_mask[rows], c.temperature,
        )  # (n, T), (n, T)
        if batch.old_logprobs is None:  # one pass over one mini-batch: rows are every row, in order
            if not torch.equal(rows.cpu(), torch.arange(batch.completion_ids.shape[0])):
                raise ValueError("a rollout scored without old log-probs needs rows = every row, in order")
            batch.old_logprobs, batch.entropy = logprobs.detach(), entropy.detach()
        return grpo_loss(
            logprobs, batch.old_logprobs[rows], advantages[rows], batch.completion_mask[rows],
            ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[rows],
            entropy=entropy, beta=c.beta, alpha=c.alpha, eps_low=c.eps_low, eps_high=c.eps_high,
            loss_type=c.loss_type, ratio_level=c.ratio_level, kl_estimator=c.kl_estimator,
            max_len=c.max_new_tokens,
        )

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward, clip, AdamW step; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        return grad_norm.item()

    def policy_updates(self, batch: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """μ passes over the rollout in ``num_minibatches`` shuffled mini-batches; mean metrics."""
        c = self.config
        n = advantages.numel()
        records = []
        was_training = self.model.training
        self.model.train()  # gradient checkpointing, when on, acts in training mode only
        for _ in range(c.num_updates):
            order = torch.randperm(n) if c.num_minibatches > 1 else torch.arange(n)
            for rows in order.chunk(c.num_minibatches):
                out = self.loss(batch, advantages, rows)
                grad_norm = self.optimizer_step(out.loss)
                records.append({
                    "loss": out.loss.item(), "policy_loss": out.policy_loss.item(),
                    "kl": None if out.kl is None else out.kl.item(),  # None: no reference (β = 0)
                    "grad_norm": grad_norm, **out.metrics,
                })
        self.model.train(was_training)  # back to the mode generation runs in (eval: KV cache on)
        return {k: mean_of([r[k] for r in records]) for k in records[0]}

    def train_step(self) -> dict[str, float]:
        """One GRPO step: rollout → rewards → advantages → μ updates → schedule step."""
        c = self.config
        start = time.perf_counter()
        batch = self.rollout(self.sample_prompts())
        rewards, reward_means = compute_rewards(batch.completions, batch.answers, c)  # (N,)
        if c.shuffle_rewards:
            rewards = shuffle_within_batch(rewards)
        advantages = group_advantages(rewards, c.group_size, scale=c.advantage_scale)  # (N,)
        advantages = advantages.to(batch.completion_ids.device)
        lr = self.scheduler.get_last_lr()[0]
        update_metrics = self.policy_updates(batch, advantages)
        self.scheduler.step()
        lengths = batch.completion_mask.sum(-1).float()  # (N,)
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            **reward_means,
            "zero_std_frac": zero_std_fraction(rewards, c.group_size),
            **update_metrics,
            "entropy": masked_mean(batch.entropy, batch.completion_mask),
            "completion_len_mean": lengths.mean().item(),
            "completion_len_max": lengths.max().item(),
            "lr": lr,
            "step_seconds": time.perf_counter() - start,
        }
        metrics = mean_over_ranks(metrics)
        self.step += 1
        metrics["step"] = self.step
        self.history.append(metrics)
        return metrics

    # --- evaluation

    def evaluate(self) -> float:
        """Greedy held-out accuracy: the fraction of eval prompts whose greedy completion scores
        1 under ``accuracy_reward`` (each rank takes its share; counts summed over ranks)."""
        c = self.config
        reward = REWARD_FUNCS[c.accuracy_reward]
        mine = self.eval_examples[self.rank :: self.world_size]
        correct = 0.0
        for i in range(0, len(mine), c.eval_batch_size):
            chunk = mine[i : i + c.eval_batch_size]
            texts = greedy_completions(self.model, self.tokenizer, [ex["prompt"] for ex in chunk], c.max_new_tokens)
            correct += sum(reward(t, ex["answer"]) == 1.0 for t, ex in zip(texts, chunk))
        totals = torch.tensor([correct, float(len(mine))], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(totals)
        accuracy = (totals[0] / totals[1].clamp(min=1)).item()
        self.evals.append({"step": self.step, "accuracy": accuracy})
        return accuracy

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
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{self.evals[-1]['accuracy']:.3f}")
        bar.close()
        if checkpoint_dir:
            self.save_checkpoint(checkpoint_dir)
        return self.history

    # --- checkpoints

    def save_checkpoint(self, directory: str | Path) -> None:
        """Parameters (and the trainer's own reference copy) as safetensors; optimizer,
        scheduler, step, history and config in ``trainer_state.pt``; each rank's RNG states
        (torch, python, numpy, prompt sampler) in ``rng_rank{r}.pt``."""
        directory = Path(directory)
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_model(self.model, str(directory / "model.safetensors"))
            if self.owns_ref:
                safetensors.torch.save_model(self.ref_model, str(directory / "ref_model.safetensors"))
            torch.save({
                "step": self.step, "history": self.history, "evals": self.evals,
                "config": dataclasses.asdict(self.config),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            }, directory / "trainer_state.pt")
        if self.world_size > 1:
            dist.barrier()
        rng = {"global": rng_states(), "prompt_rng": self.prompt_rng.getstate()}
        torch.save(rng, directory / f"rng_rank{self.rank}.pt")
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore everything ``save_checkpoint`` wrote; training then continues exactly."""
        directory = Path(directory)
        safetensors.torch.load_model(self.model, str(directory / "model.safetensors"))
        if self.owns_ref:
            safetensors.torch.load_model(self.ref_model, str(directory / "ref_model.safetensors"))
        state = torch.load(directory / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        rng = torch.load(directory / f"rng_rank{self.rank}.pt", weights_only=False)
        set_rng_states(rng["global"])
        self.prompt_rng.setstate(rng["prompt_rng"])


def has_checkpoint(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / "trainer_state.pt").exists()


# ---------------------------------------------------------------- the warm-up (pre-training stand-in)


@dataclass
class WarmupConfig:
    """Supervised warm-up of the tiny model on (possibly sloppy) arithmetic demonstrations."""

    digits: int = 2
    """operands have up to this many digits"""
    sloppiness: float = 0.6
    """probability that the teacher drops the carries on a carry problem (0: clean teacher);
    0.6 leaves held-out accuracy at ~0.3-0.45 with the carries mostly wrong, yet sampled often
    enough for the reward to find them"""
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


def supervised_loss(model, tokenizer, batch: list[dict[str, str]]) -> torch.Tensor:
    """Mean −log π(answer tokens, EOS | prompt) over the batch's answer tokens."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [ex["prompt"] for ex in batch])  # (B, L)
    eos = [tokenizer.eos_token_id]
    answers = [tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + eos for ex in batch]
    T = max(len(a) for a in answers)
    completion_ids = torch.tensor([a + [tokenizer.pad_token_id] * (T - len(a)) for a in answers])  # (B, T)
    mask = torch.tensor([[1] * len(a) + [0] * (T - len(a)) for a in answers])  # (B, T)
    logprobs, _ = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask)  # (B, T)
    return -(logprobs * mask).sum() / mask.sum()


def supervised_warmup(model, tokenizer, config: WarmupConfig, progress: bool = True) -> list[float]:
    """Train ``model`` on the teacher's demonstrations; returns the loss per step."""
    examples = warmup_examples(config.steps * config.batch_size, config.digits, config.sloppiness, config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
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


def warmup_key(config: WarmupConfig) -> str:
    """A short hash of the warm-up config: the cache folder's name."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True)
    return "warmup-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def warmup_model(config: WarmupConfig, cache_dir: str | Path | None = None, progress: bool = True):
    """``(model, tokenizer, info)`` after the supervised warm-up; ``info`` holds ``sft_seconds``
    and ``losses``.  With ``cache_dir`` the result is saved under a folder named by the config's
    hash and loaded from there next time, with the same ``info`` (the seconds of the original run)."""
    folder = Path(cache_dir) / warmup_key(config) if cache_dir is not None else None
    if folder is not None and (folder / "warmup.json").exists():
        model, tokenizer = load_tiny(folder)
        return model, tokenizer, json.loads((folder / "warmup.json").read_text())
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
    return model, tokenizer, info
