"""A ``GRPOConfig`` as TRL's: the translation the TRL comparisons (chapter 12,
``tests/test_trl_equivalence.py``, ``benchmarks/trl_step_time.py``) share, for one process."""

from __future__ import annotations

import torch.distributed as dist

from minigrpo.config import GRPOConfig
from minigrpo.distributed import launched_world_size
from minigrpo.losses import CISPO_EPS_HIGH


def trl_grpo_kwargs(config: GRPOConfig) -> dict:
    """The same hyperparameters as keyword arguments of TRL's ``trl.GRPOConfig`` (TRL 1.16), for
    a run in one process without gradient accumulation.

    Called in a process of several (``WORLD_SIZE`` > 1, or an initialised process group of more
    than one) it raises ``ValueError``: TRL's ``generation_batch_size`` counts every process's
    completions and ``per_device_train_batch_size`` one process's, so these sizes would ask for a
    batch as many times larger as there are processes (TRL refuses it as not divisible), and with
    the per-device size divided by that number TRL's "bnpo" would divide each process's
    micro-batch by its own token count, not the whole batch's as minigrpo's "dapo" does.

    minigrpo's "dapo" (token mean of the whole optimiser mini-batch, over its micro-batches and
    ranks) is TRL's "bnpo" in one process without gradient accumulation (TRL's "bnpo" divides
    each micro-batch by its own token count); TRL's own "dapo" divides by the tokens of the
    whole generation batch, rescaled to one optimiser step.  CISPO is TRL's ``loss_type="cispo"``, whose
    token mean is over the generation batch too and whose ``epsilon_high`` is the cap on the
    weight itself, 1 + ε_high: it matches minigrpo's cispo with "dapo" and one mini-batch (its
    logged ``cispo_clip_ratio`` counts capped tokens with Â > 0 only, minigrpo's
    ``clip_frac_high`` every token the cap changed).  A
    TRL step is one optimiser step, so step counts are multiplied by the updates per rollout.

    The rollout correction is TRL's vLLM importance sampling: ``rollout_correction`` →
    ``vllm_importance_sampling_correction`` (False when None) and ``vllm_importance_sampling_mode``
    (same four names), ``rollout_ratio_min`` / ``rollout_ratio_max`` →
    ``vllm_importance_sampling_clip_min`` / ``_clip_max`` (TRL 1.16's names; ``_cap`` is its
    deprecated alias of ``_clip_max``); TRL applies it only with ``use_vllm=True``, where vLLM's
    log-probs are π_rollout.  ``off_policy_mask_threshold`` keeps its name; TRL's mask, like
    minigrpo's, uses the sampler's log-probs when it has them and the old ones otherwise.

    TRL's ``entropy_coef`` subtracts coef × the token mean of the entropy for every loss type
    (in one process, minigrpo's α term under "dapo" only); untested here, so α > 0 is refused
    with what has no TRL counterpart: the k1/k2 estimators, shuffled rewards, the leave-one-out
    baseline, dynamic sampling, per-reward normalisation, top-k/top-p (TRL 1.16 samples with them
    but scores without them) or the overlong penalty
    (TRL has it as a reward function, ``trl.rewards.get_soft_overlong_punishment``), nor for a
    ``"*_truncate"`` correction without any bound or one with C_min = C_max (TRL wants at least one
    bound and C_min < C_max): those raise ``ValueError``.
    """
    processes = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launched_world_size()
    if processes > 1:
        raise ValueError(f"trl_grpo_kwargs translates a one-process run; this is one of {processes} processes "
                         "(TRL's batch sizes and its 'bnpo' token mean are per process)")
    unsupported = dict(alpha=config.alpha != 0, kl_estimator=config.kl_estimator != "k3",
                       shuffle_rewards=config.shuffle_rewards, advantage_baseline=config.advantage_baseline != "mean",
                       dynamic_sampling=config.dynamic_sampling, overlong_cache=config.overlong_cache > 0,
                       normalize_each_reward=config.normalize_each_reward,
                       # TRL 1.16 samples with top-k/top-p but scores without them: another law (chapter 9)
                       top_k_or_top_p=config.top_k != 0 or config.top_p != 1.0)
    bounds = (config.rollout_ratio_min, config.rollout_ratio_max)
    if config.rollout_correction is not None:
        unsupported["rollout_ratio_min == rollout_ratio_max"] = bounds[0] is not None and bounds[0] == bounds[1]
        unsupported["a truncate rollout_correction without bounds"] = (
            config.rollout_correction.endswith("truncate") and bounds == (None, None))
    if any(unsupported.values()):
        raise ValueError(f"not translated to TRL: {[k for k, v in unsupported.items() if v]} "
                         "(TRL 1.16's GRPOConfig has no option checked to match)")
    n = config.prompts_per_step * config.group_size  # sequences per rollout
    updates = config.num_updates * config.num_minibatches
    if config.eps_high is not None:
        eps_high = config.eps_high
    else:  # grpo_loss's own defaults
        eps_high = CISPO_EPS_HIGH if config.surrogate == "cispo" else config.eps_low
    if config.surrogate == "cispo":
        if config.loss_type != "dapo" or config.num_minibatches != 1:
            raise ValueError("TRL's cispo is minigrpo's cispo with loss_type='dapo' and one mini-batch")
        loss_type, epsilon_high = "cispo", 1 + eps_high
    else:
        loss_type, epsilon_high = {"dapo": "bnpo"}.get(config.loss_type, config.loss_type), eps_high
    rollout = {} if config.rollout_correction is None else dict(
        vllm_importance_sampling_mode=config.rollout_correction,
        vllm_importance_sampling_clip_min=config.rollout_ratio_min,
        vllm_importance_sampling_clip_max=config.rollout_ratio_max)
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
        vllm_importance_sampling_correction=config.rollout_correction is not None, **rollout,
        off_policy_mask_threshold=config.off_policy_mask_threshold,
    )
