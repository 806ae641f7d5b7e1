"""The GRPO training loop: one trainer for any causal LM, steered by a ``GRPOConfig``.

The objective it minimises::

    L_GRPO(θ) = E_{q~P(Q), {o_i}~π_θold} [ L_PG(·|θ) + β·L_KL(·,θ,θ_ref) + α·L_Entropy(·,θ) ]

Each step: draw prompts q, roll out G completions each (``minigrpo.rollout``), score them with
weighted reward functions, turn rewards into group-relative advantages
(``minigrpo.group_advantages``), then take μ passes of ``minigrpo.grpo_loss`` over the batch
with AdamW.  Greedy held-out accuracy (``minigrpo.evaluation``) is measured before training,
every ``eval_every`` steps and at the end.

One optimiser step gets one gradient however its batch is split: the loss's denominator (N
sequences, or the token count) is counted over the whole mini-batch, all micro-batches and all
ranks, before any backward pass, and every piece divides by it (``losses.aggregate``'s
``normalizer``); the pieces' gradients then add up to the whole batch's.  Micro-batches of at
most ``rows_per_pass`` rows bound the memory of the update's logits and their gradient.

With ``sampler_dtype`` or ``rollout_lag`` set, a separate copy of the policy samples, as an
inference engine would (``models.Sampler``): in its own dtype, with the weights of
``rollout_lag`` optimiser updates ago, synced after every update; it scores its own
``rollout_logprobs``, which the loss's rollout correction (``rollout_correction``,
``off_policy_mask_threshold``) weighs against π_θold.  With ``top_k`` / ``top_p`` the sampler
truncates, and every log-prob (π_rollout, π_θold, π_θ, π_ref) is of the same truncated law.

Under ``torchrun`` (``distributed.init_distributed``) each rank samples its share of the
prompts, the gradients are summed over ranks once per optimiser step
(``distributed.sum_gradients``), metrics are averaged over ranks and rank 0 writes checkpoints.

    trainer = GRPOTrainer(model, tokenizer, train_examples, eval_examples, GRPOConfig())
    trainer.train()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import safetensors.torch
import torch
from tqdm.auto import tqdm

from minigrpo import checkpoints
from minigrpo.advantages import (combine, compute_rewards, group_advantages, live_groups, soft_overlong_penalty,
                                 zero_std_fraction)
from minigrpo.config import OVERLONG_PENALTY, GRPOConfig
from minigrpo.distributed import (broadcast_parameters, dist_info, gather_objects, gathered, interleave,
                                  mean_over_ranks, sum_gradients, sum_over_ranks)
from minigrpo.doctor import DoctorThresholds, RunDoctor, reward_range
from minigrpo.evaluation import EvalResult, evaluate
from minigrpo.losses import LENGTH_METRICS, aggregation_normalizer, grpo_loss, length_metrics
from minigrpo.metrics import MetricLog, reduce_updates
from minigrpo.models import Sampler, is_lora, peak_memory, reference_model
from minigrpo.optim import adamw, lr_lambda
from minigrpo.rollout import (Rollout, completion_logprobs, concat_rollouts, model_device, rollout, row_chunks,
                              select_groups, shared_prefix_rows)
from minigrpo.runlog import RunLog

logger = logging.getLogger("minigrpo")

SAMPLER_FILE = "sampler.safetensors"
"""A checkpoint's file of the lagged sampler's weights and queue (``rollout_lag`` > 0 only)."""

# ---------------------------------------------------------------- the trainer


class GRPOTrainer:
    """GRPO on a causal LM: ``train()`` runs ``config.steps`` steps; ``history`` holds one
    ``MetricLog`` per step and ``evals`` one ``EvalResult`` per evaluation.

    ``train_examples`` / ``eval_examples`` are lists of ``{"prompt", "answer"}``.  The reference
    model π_ref (kept when β > 0) is ``models.reference_model(model)``: the LoRA policy with its
    adapter switched off, else a frozen copy of ``model`` as given.  The sampler π_rollout, when
    the config asks for a separate one (``GRPOConfig.separate_sampler``), is a ``models.Sampler``
    built from ``model`` as given, else None (the policy samples itself).  The trainer draws its
    random numbers from its own generator state, seeded by ``config.seed`` (+ rank), and leaves
    the global RNGs as they were.  After each step of ``train`` the run doctor
    (``doctor.RunDoctor``, thresholds ``doctor``, default ``DoctorThresholds()``) warns on logger
    "minigrpo" of each symptom whose episode starts there, and the step's ``symptoms`` lists the
    codes present.
    """

    def __init__(self, model, tokenizer, train_examples, eval_examples, config: GRPOConfig,
                 doctor: DoctorThresholds | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)[: config.eval_size]
        self.rank, self.world_size = dist_info()
        if not self.train_examples:
            raise ValueError("train_examples is empty: GRPO needs prompts to sample")
        if config.prompts_per_step % self.world_size:
            raise ValueError(f"prompts_per_step={config.prompts_per_step} is not divisible by {self.world_size} ranks")
        if (config.prompts_per_step // self.world_size) % config.num_minibatches:
            raise ValueError(f"num_minibatches={config.num_minibatches} must divide each rank's "
                             f"{config.prompts_per_step // self.world_size} prompts (mini-batches of whole groups)")
        self.model = model
        self.device = model_device(model)
        broadcast_parameters(model)  # every rank starts from rank 0's weights
        self.ref_model = reference_model(model) if config.beta > 0 else None
        self.owns_ref = self.ref_model is not None and not is_lora(model)  # a copy: it goes in checkpoints
        self.sampler = None
        if config.separate_sampler:
            dtype = None if config.sampler_dtype is None else getattr(torch, config.sampler_dtype)
            self.sampler = Sampler(model, dtype, config.rollout_lag)
        self.prompt_rng = random.Random(config.seed + self.rank)
        self.rng_state = self._seeded_rng_state(config.seed + self.rank)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.step = 0
        self.history: list[MetricLog] = []
        self.evals: list[EvalResult] = []
        self.run_info: dict = {}
        """JSON-ready facts of the run that a checkpoint carries along (the warm-up's timings, say)"""
        self.doctor = RunDoctor(doctor, rewards=reward_range(config.reward_weights, config.overlong_cache > 0),
                                log=self.rank == 0)  # every rank sees the same metrics: one warning per run

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
        """G completions per example, drawn by the sampler (the policy itself when there is none)
        and scored (``minigrpo.rollout``)."""
        c = self.config
        return rollout(
            self.model, self.tokenizer, examples, group_size=c.group_size, temperature=c.temperature,
            max_new_tokens=c.max_new_tokens, ref_model=self.ref_model, score_old=not self.single_update,
            rows_per_pass=c.rows_per_pass, shared_prefill=c.shared_prefill, top_k=c.top_k, top_p=c.top_p,
            sampler=None if self.sampler is None else self.sampler.model,
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
            means[f"reward_{OVERLONG_PENALTY}"] = penalty.mean().item()
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
        with ``normalize_each_reward``, Σ_k w_k·Â(r_k), each part normalised in its group first.
        Under torchrun they are computed over every rank's rewards (so "batch" divides by the
        std of the whole batch, as in one process) and each rank keeps its own rows."""
        c = self.config
        parts, mine = gathered(parts, dim=1)  # (K, N of all ranks)

        def adv(r):
            return group_advantages(r, c.group_size, scale=c.advantage_scale, baseline=c.advantage_baseline)

        if c.normalize_each_reward:
            return sum(w * adv(r) for w, r in zip(weights.tolist(), parts))[mine]
        return adv(combine(parts, weights))[mine]

    def policy_updates(self, batch: Rollout, advantages: torch.Tensor) -> dict[str, float | None]:
        """μ passes over the rollout, each in ``num_minibatches`` mini-batches of whole groups in
        random order (the same count on every rank), one AdamW step each (``update``).  The model
        is in training mode inside and back in its own mode after, also after an exception."""
        c = self.config
        n_groups = advantages.numel() // c.group_size
        rows_of = torch.arange(advantages.numel(), device=self.device).view(n_groups, c.group_size)  # (P, G)
        records = []
        was_training = self.model.training
        self.model.train()  # gradient checkpointing, when on, acts in training mode only
        try:
            for _ in range(c.num_updates):
                order = torch.randperm(n_groups) if c.num_minibatches > 1 else torch.arange(n_groups)
                for groups in order.tensor_split(c.num_minibatches):  # may be empty after dynamic sampling
                    records.append(self.update(batch, advantages, rows_of[groups.to(self.device)].flatten()))
        finally:
            self.model.train(was_training)  # back to the mode generation runs in (eval: KV cache on)
        taken = [r for r in records if r is not None]
        metrics = reduce_updates(taken) if taken else {}
        metrics["skipped_updates"] = sum(r is None or r["grad_norm"] is None for r in records)
        return metrics

    def loss_mask(self, batch: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """The tokens the loss counts: the completions', without those cut at the limit when
        ``mask_truncated`` (overlong filtering: a completion with no EOS teaches nothing)."""
        mask = batch.completion_mask[rows]
        return mask * ~batch.truncated[rows, None] if self.config.mask_truncated else mask

    def update(self, batch: Rollout, advantages: torch.Tensor, rows: torch.Tensor) -> MetricLog | None:
        """One AdamW step on the mini-batch ``rows`` (this rank's share of it).

        The loss's denominator is counted over the whole mini-batch (every rank's rows) first;
        then the rows run in micro-batches of at most ``rows_per_pass`` (whole groups with a
        shared prefix), each ``grpo_loss`` divided by that count and backpropagated at once, so
        the accumulated gradient is the whole mini-batch's; it is summed over ranks, clipped and
        applied.  A non-finite gradient norm skips the step (logged; ``grad_norm`` is None).
        None when the mini-batch is empty on every rank.  π_θold comes from the rollout or, when
        it has none (``single_update``), from this pass's own log-probs, detached."""
        c = self.config
        mask = self.loss_mask(batch, rows)  # (n, T)
        normalizer, n_rows = sum_over_ranks([aggregation_normalizer(mask, c.loss_type, c.max_new_tokens), len(rows)])
        if n_rows == 0:
            return None
        normalizer = max(normalizer, 1)  # no token anywhere ("dapo"): the loss is 0, as in aggregate
        shared = shared_prefix_rows(self.model, c.group_size, c.shared_prefill)
        self.optimizer.zero_grad(set_to_none=True)
        pieces = []
        for chunk in row_chunks(len(rows), c.rows_per_pass, shared):
            r = rows[chunk]
            logprobs, entropy = completion_logprobs(
                self.model, batch.prompt_ids[r], batch.prompt_mask[r], batch.completion_ids[r], mask[chunk],
                c.temperature, shared, top_k=c.top_k, top_p=c.top_p,
            )  # (n, T), (n, T)
            old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[r]
            ref = None if batch.ref_logprobs is None else batch.ref_logprobs[r]
            sampled = None if batch.rollout_logprobs is None else batch.rollout_logprobs[r]
            self.loss(logprobs, old, advantages[r], mask[chunk], ref, entropy, normalizer, sampled).loss.backward()
            pieces.append((logprobs.detach(), old, ref, entropy.detach(), sampled))
        return self.finish_update(batch, advantages, rows, mask, pieces, normalizer)

    def loss(self, logprobs, old, advantages, mask, ref, entropy, normalizer, rollout_logprobs=None):
        """``grpo_loss`` of these rows with the config's options, divided by ``normalizer``;
        ``rollout_logprobs`` (the sampler's, None without one) for the rollout correction."""
        c = self.config
        return grpo_loss(
            logprobs, old, advantages, mask, ref_logprobs=ref, entropy=entropy, beta=c.beta, alpha=c.alpha,
            eps_low=c.eps_low, eps_high=c.eps_high, loss_type=c.loss_type, ratio_level=c.ratio_level,
            kl_estimator=c.kl_estimator, max_len=c.max_new_tokens, surrogate=c.surrogate,
            kl_bias_correction=c.kl_bias_correction, normalizer=normalizer, rollout_logprobs=rollout_logprobs,
            rollout_correction=c.rollout_correction, rollout_ratio_min=c.rollout_ratio_min,
            rollout_ratio_max=c.rollout_ratio_max, off_policy_mask_threshold=c.off_policy_mask_threshold,
        )

    def finish_update(self, batch, advantages, rows, mask, pieces, normalizer) -> MetricLog:
        """Sum the gradient over ranks, clip and step (or skip a non-finite one: no update, the
        sampler stays), then sync the sampler (``Sampler.updated``: it takes the weights of
        ``rollout_lag`` updates ago); the update's
        metrics: the loss terms of the whole mini-batch (summed over its pieces and ranks), and
        ``grpo_loss``'s token statistics of this rank's share, completion lengths counting every
        completion (also those ``mask_truncated`` takes out of the loss)."""
        sum_gradients(self.trainable)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm).item()
        if math.isfinite(grad_norm):
            self.optimizer.step()
            if self.sampler is not None:
                self.sampler.updated()
        else:  # every rank holds the same summed gradient: every rank skips alike
            logger.warning("step %d: gradient norm %s, optimiser step skipped", self.step + 1, grad_norm)
            grad_norm = None
        self.optimizer.zero_grad(set_to_none=True)
        if rows.numel():
            logprobs, old, ref, entropy, sampled = (None if pieces[0][k] is None else torch.cat([p[k] for p in pieces])
                                                    for k in range(5))
            out = self.loss(logprobs, old, advantages[rows], mask, ref, entropy, normalizer, sampled)
            terms = [out.loss.item(), out.policy_loss.item(), out.entropy.item(), 0.0 if out.kl is None else out.kl.item()]
            stats = {k: v for k, v in out.metrics.items() if k not in LENGTH_METRICS}
            stats.update(length_metrics(batch.completion_mask[rows], advantages[rows]))
            stats.setdefault("kl_token_mean", None)  # no reference (β = 0): logged as None, like "kl"
        else:  # this rank had no rows in the mini-batch; its statistics count out
            terms, stats = [0.0] * 4, {}
        loss, policy_loss, entropy_term, kl = sum_over_ranks(terms)
        record = MetricLog(loss=loss, policy_loss=policy_loss, entropy=entropy_term, grad_norm=grad_norm,
                           kl=kl if self.ref_model is not None else None,  # None: no reference (β = 0)
                           masked_frac=1.0 - (mask.sum(-1) > 0).double().mean().item() if rows.numel() else None)
        record.update(stats)
        return record

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
            shares = gather_objects((result.completions, result.correct_mask, result.truncated_frac * result.n))
            correct_mask = interleave([verdicts for _, verdicts, _ in shares])
            n = len(correct_mask)
            result = EvalResult(step=self.step, n=n, correct=sum(correct_mask),
                                truncated_frac=sum(share[2] for share in shares) / max(n, 1),
                                completions=interleave([texts for texts, _, _ in shares]), correct_mask=correct_mask)
        self.evals.append(result)
        return result

    # --- the loop

    def due_for_eval(self) -> bool:
        """Evaluate every ``eval_every`` steps and after the last step, whatever ``until`` is
        (so a run stopped and resumed evaluates at the same steps as one run straight)."""
        c = self.config
        return self.step == c.steps or bool(c.eval_every) and self.step % c.eval_every == 0

    def train(self, until: int | None = None, checkpoint_dir: str | Path | None = None, progress: bool = True,
              log_dir: str | Path | None = None):
        """Run steps up to ``until`` (default ``config.steps``; stop earlier to resume later),
        evaluating at step 0, every ``eval_every`` steps and at the end, and checkpointing to
        ``checkpoint_dir`` every ``checkpoint_every`` steps and when stopping.  After each step
        (and its evaluation) the run doctor checks the step; with ``log_dir``, rank 0 appends
        the step's metrics (and the accuracy of an evaluation made then) to the run log there
        (``runlog.RunLog``: metrics.jsonl, and TensorBoard where installed)."""
        c = self.config
        until = c.steps if until is None else until
        with RunLog(log_dir) if log_dir and self.rank == 0 else contextlib.nullcontext() as log:
            if not self.evals:
                self.evaluate()
                if log:
                    log.write({"step": 0, "accuracy": self.evals[0].accuracy})
            bar = tqdm(total=until, initial=self.step, desc="GRPO", disable=not progress or self.rank != 0)
            while self.step < until:
                metrics = self.train_step()
                evaluated = self.due_for_eval()
                if evaluated:
                    self.evaluate()
                self.doctor.check(metrics, self.evals)
                metrics["symptoms"] = list(self.doctor.present)
                if log:
                    log.write({**metrics, "accuracy": self.evals[-1].accuracy} if evaluated else metrics)
                if checkpoint_dir and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", cut=f"{metrics['truncated_frac']:.2f}",
                                acc=f"{self.evals[-1].accuracy:.3f}")  # cut: the share of completions at the limit
            bar.close()
        if checkpoint_dir:
            self.save_checkpoint(checkpoint_dir)
        return self.history

    # --- checkpoints

    def save_checkpoint(self, directory: str | Path) -> None:
        """Parameters (under LoRA the adapter's; and the trainer's own reference copy; and, with
        ``rollout_lag`` > 0, the sampler's lagged weights and queue, ``Sampler.state_dict``) as safetensors; optimizer,
        scheduler, step, history, evaluations, ``run_info`` and config in ``trainer_state.pt``;
        each rank's random state in ``rng_rank{r}.pt``.  Everything loads with
        ``weights_only=True``; the folder is replaced whole or not at all (``checkpoints``)."""

        def write(folder: Path) -> None:
            if self.rank == 0:
                self._save_model(folder / "model.safetensors")
                if self.owns_ref:
                    safetensors.torch.save_model(self.ref_model, str(folder / "ref_model.safetensors"))
                if self.sampler is not None and self.sampler.lag:
                    safetensors.torch.save_file(self.sampler.state_dict(), str(folder / SAMPLER_FILE))
                torch.save({
                    "step": self.step, "history": [dict(h) for h in self.history],
                    "evals": [dataclasses.asdict(e) for e in self.evals], "config": self.config.to_dict(),
                    "run_info": self.run_info, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                }, folder / checkpoints.STATE_FILE)
            torch.save({"torch": self.rng_state, "prompts": self.prompt_rng.getstate()}, folder / f"rng_rank{self.rank}.pt")

        checkpoints.write_atomically(directory, write)

    def _save_model(self, path: Path) -> None:
        """Every parameter; under LoRA the trainable adapter only (the frozen base is the
        checkpoint the run started from, loaded again on resume)."""
        if is_lora(self.model):
            trained = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            safetensors.torch.save_file(trained, str(path))
        else:
            safetensors.torch.save_model(self.model, str(path))

    def _load_model(self, path: Path) -> None:
        if is_lora(self.model):
            state = safetensors.torch.load_file(str(path), device=str(self.device))
            trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if set(state) != trained:
                raise ValueError(f"{path} holds other adapter weights than this model trains")
            self.model.load_state_dict(state, strict=False)
        else:
            safetensors.torch.load_model(self.model, str(path), device=str(self.device))

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore everything ``save_checkpoint`` wrote; training then continues exactly.  A
        ``ValueError`` when ``directory`` holds no checkpoint or one written under another config."""
        folder = checkpoints.locate(directory)
        if folder is None:
            raise ValueError(f"no checkpoint in {str(directory)!r}")
        state = torch.load(folder / checkpoints.STATE_FILE, weights_only=True)
        checkpoints.check_config(state["config"], self.config.to_dict())
        self._load_model(folder / "model.safetensors")
        if self.owns_ref:
            safetensors.torch.load_model(self.ref_model, str(folder / "ref_model.safetensors"), device=str(self.device))
        if self.sampler is not None:  # lag 0: the sampler takes the policy's weights just loaded
            lagged = self.sampler.lag > 0
            self.sampler.load_state_dict(
                safetensors.torch.load_file(str(folder / SAMPLER_FILE), device=str(self.device)) if lagged else {})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = [MetricLog(h) for h in state["history"]]
        self.evals = [EvalResult(**e) for e in state["evals"]]
        self.doctor.catch_up(self.history, self.evals)  # the steps after judged as in an unbroken run
        self.run_info = state["run_info"]
        rng = torch.load(folder / f"rng_rank{self.rank}.pt", weights_only=True)
        self.rng_state = rng["torch"]
        self.prompt_rng.setstate(rng["prompts"])
