"""Rollouts: G completions per prompt from the old policy π_θold, with masks and log-probs.

The expectation in L_GRPO is over prompts q ~ P(Q) and groups {o_i}_{i=1..G} ~ π_θold(O|q).
A rollout samples that group with the KV cache (``model.generate``), marks each completion's
tokens up to and including its first EOS, and scores them once, under ``no_grad``, with the
policy (``old_logprobs``) and the frozen reference (``ref_logprobs``).

Shapes: P prompts, N = P·G sequences (rows i·G … i·G+G−1 are prompt i's group), L prompt
positions (left-padded), T completion positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigrpo.logprobs import token_logprobs_and_entropy


@dataclass
class Rollout:
    """One batch of sampled groups, everything the loss needs."""

    prompt_ids: torch.Tensor  # (N, L) each prompt repeated G times, left-padded
    prompt_mask: torch.Tensor  # (N, L) 1 on prompt tokens, 0 on padding
    completion_ids: torch.Tensor  # (N, T) sampled tokens; after the EOS: padding
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    old_logprobs: torch.Tensor | None  # (N, T) log π_θold(o_t | q, o_<t); None: not scored yet
    ref_logprobs: torch.Tensor | None  # (N, T) log π_ref(o_t | q, o_<t), None without a reference
    entropy: torch.Tensor | None  # (N, T) entropy of π_θold at each position; None: not scored yet
    completions: list[str]  # (N,) decoded completions, special tokens dropped
    answers: list[str]  # (N,) each prompt's gold answer, repeated G times
    group_size: int


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token: cumsum(mask) − 1 (padding → 0).

    With left padding the first real token must sit at position 0, as it did in training.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenize_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, both (P, L)."""
    if not prompts:
        raise ValueError("prompts is empty")
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=True)
    return batch["input_ids"], batch["attention_mask"]


def model_device(model) -> torch.device:
    """Where the (possibly DDP-wrapped) model's parameters live."""
    return next(unwrap(model).parameters()).device


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompt_ids, prompt_mask, *, group_size, temperature, max_new_tokens, greedy=False
) -> torch.Tensor:
    """Sample ``group_size`` completions per prompt with the KV cache; returns (P·G, T) token ids,
    rows grouped by prompt.  ``greedy=True`` takes the arg-max token instead (then G must be 1).

    transformers 5 leaves top-k/top-p/temperature unset unless given, so they are passed
    explicitly: plain sampling from softmax(logits / temperature), no truncation.
    """
    sampling = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    )
    output = unwrap(model).generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        num_return_sequences=group_size,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        **sampling,
    )  # (P·G, L + T)
    return output[:, prompt_ids.shape[1] :]  # (P·G, T)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first EOS, 0 after it.

    A completion without an EOS (cut at max_new_tokens) is kept whole.
    """
    is_eos = completion_ids == eos_token_id  # (N, T)
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before t
    return (eos_before == 0).long()  # (N, T)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """Per-token log π(o_t | q, o_<t) and entropy at the completion positions, both (N, T),
    for the distribution the completions are sampled from: π = softmax(logits / τ).

    One forward pass over [prompt, completion]; the logits that predict o_t sit one position
    earlier, so only the T positions L−1 … L+T−2 are turned into logits (``logits_to_keep``).
    The ratio π_θ/π_θold, the KL to π_ref and the entropy all use the same τ as sampling, so at
    τ ≠ 1 the ratio is still exactly 1 before the first update.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, L + T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, L + T)
    T = completion_ids.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=T + 1,
        use_cache=False,
    ).logits[:, :-1]  # (N, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs_and_entropy(logits, completion_ids)  # (N, T), (N, T)


def decode_completions(tokenizer, completion_ids, completion_mask) -> list[str]:
    """Completions as text: the masked tokens, special tokens (EOS, padding) dropped."""
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids.cpu(), completion_mask.cpu())
    ]


@torch.no_grad()
def rollout(
    model,
    tokenizer,
    examples: list[dict[str, str]],
    *,
    group_size: int,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    ref_model=None,
    score_old: bool = True,
) -> Rollout:
    """Sample a group of ``group_size`` completions for each example's prompt and score them.

    Old log-probs come from ``model`` (π_θold = π_θ at sampling time) and reference log-probs
    from ``ref_model``, both computed once here, without gradients, at the sampling temperature.
    ``score_old=False`` skips the old pass and leaves ``old_logprobs`` and ``entropy`` None: a
    trainer whose only update is one pass over one mini-batch sees θ = θ_old there and takes
    both from that update's forward pass (TRL does the same when ``num_iterations=1``).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be ≥ 1, got {group_size}")
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [ex["prompt"] for ex in examples])
    prompt_ids, prompt_mask = prompt_ids.to(model_device(model)), prompt_mask.to(model_device(model))
    completion_ids = sample_completions(
        model, tokenizer, prompt_ids, prompt_mask,
        group_size=group_size, temperature=temperature, max_new_tokens=max_new_tokens,
    )  # (N, T)
    mask = completion_mask(completion_ids, tokenizer.eos_token_id)  # (N, T)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)  # (N, L)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)  # (N, L)
    old_logprobs = entropy = None
    if score_old:
        old_logprobs, entropy = completion_logprobs(
            unwrap(model), prompt_ids, prompt_mask, completion_ids, mask, temperature
        )  # (N, T), (N, T)
    ref_logprobs = None
    if ref_model is not None:
        ref_logprobs, _ = completion_logprobs(ref_model, prompt_ids, prompt_mask, completion_ids, mask, temperature)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        completions=decode_completions(tokenizer, completion_ids, mask),
        answers=[ex["answer"] for ex in examples for _ in range(group_size)],
        group_size=group_size,
    )


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy (arg-max) completions, one per prompt, as text: what evaluation scores."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts)
    prompt_ids, prompt_mask = prompt_ids.to(model_device(model)), prompt_mask.to(model_device(model))
    completion_ids = sample_completions(
        model, tokenizer, prompt_ids, prompt_mask,
        group_size=1, temperature=1.0, max_new_tokens=max_new_tokens, greedy=True,
    )
    return decode_completions(tokenizer, completion_ids, completion_mask(completion_ids, tokenizer.eos_token_id))
