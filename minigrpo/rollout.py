"""Rollouts: G completions per prompt from the old policy π_θold, with masks and log-probs.

The expectation in L_GRPO is over prompts q ~ P(Q) and groups {o_i}_{i=1..G} ~ π_θold(O|q).
A rollout samples that group with the KV cache (``model.generate``), marks each completion's
tokens up to and including its first EOS, and scores them, under ``no_grad``, with the policy
(``old_logprobs``) and the frozen reference (``ref_logprobs``).

Sampling is from exactly softmax(truncate(logits / τ)), whatever checkpoint is loaded, where the
truncation is the caller's top-k / top-p (``logprobs.truncate_logits``; by default none, so
softmax(logits / τ)): ``generate`` would otherwise inherit the checkpoint's ``generation_config``
(Qwen2.5-Instruct ships a repetition penalty of 1.1, top-k 20 and top-p 0.8), and the ratio, the
KL and the entropy would be computed for a different distribution than the one sampled.  Every
log-prob here is of the same truncated law.  Generation stops on every EOS id the checkpoint
declares.

Three policies when the sampler is a different program (``rollout(..., sampler=...)``): π_rollout,
the sampler (an inference engine's copy of the weights, in lower precision or some updates old),
draws the tokens and scores them (``rollout_logprobs``); π_θold, the trainer's policy at sampling
time, scores the same tokens (``old_logprobs``); π_θ is trained.  ``losses.grpo_loss`` corrects
for the gap between the first two.

Shapes: P prompts, N = P·G sequences (rows i·G … i·G+G−1 are prompt i's group), L prompt
positions (left-padded), T completion positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from minigrpo.logprobs import token_logprobs_and_entropy
from minigrpo.models import merged_lora  # noqa: F401  (also importable from here)


@dataclass
class Rollout:
    """One batch of sampled groups, everything the loss needs."""

    prompt_ids: torch.Tensor  # (N, L) each prompt repeated G times, left-padded
    prompt_mask: torch.Tensor  # (N, L) 1 on prompt tokens, 0 on padding
    completion_ids: torch.Tensor  # (N, T) sampled tokens; after the EOS: padding
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    truncated: torch.Tensor  # (N,) True where no EOS came within max_new_tokens
    old_logprobs: torch.Tensor | None  # (N, T) log π_θold(o_t | q, o_<t); None: not scored
    ref_logprobs: torch.Tensor | None  # (N, T) log π_ref(o_t | q, o_<t); None: no reference
    completions: list[str]  # (N,) decoded completions, special tokens dropped
    answers: list[str]  # (N,) each prompt's gold answer, repeated G times
    rollout_logprobs: torch.Tensor | None = None  # (N, T) log π_rollout(o_t | q, o_<t), float32; None: no sampler


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def model_device(model) -> torch.device:
    """Where the (possibly DDP-wrapped) model's parameters live."""
    return next(unwrap(model).parameters()).device


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token: cumsum(mask) − 1 (padding → 0).

    With left padding the first real token must sit at position 0, as it did in training.
    Only for forward passes: ``generate`` derives positions from the attention mask itself.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenize_prompts(tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, both (P, L), on ``device``: left whatever the
    tokenizer's own ``padding_side`` (a checkpoint's saved tokenizer is often right-padded), so
    every prompt's last token is in the last column, where generation continues."""
    if not prompts:
        raise ValueError("prompts is empty")
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=True)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id: the tokenizer's and all the checkpoint declares (Qwen2.5-Instruct:
    ``<|im_end|>`` and ``<|endoftext|>``)."""
    declared = getattr(unwrap(model).generation_config, "eos_token_id", None)
    declared = declared if isinstance(declared, (list, tuple)) else [declared]
    return sorted({i for i in (tokenizer.eos_token_id, *declared) if i is not None})


@contextlib.contextmanager
def plain_generation_config(model, eos_ids: list[int], pad_id: int):
    """Inside the block the model's ``generation_config`` is a fresh one holding only the special
    ids, so ``generate`` inherits no sampling setting (repetition penalty, top-k/top-p, n-gram
    bans, suppressed tokens, minimum lengths) from the checkpoint."""
    hf_model = unwrap(model)
    if hasattr(hf_model, "get_base_model"):  # peft: generate runs on the base model
        hf_model = hf_model.get_base_model()
    saved = hf_model.generation_config
    hf_model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
    try:
        yield
    finally:
        hf_model.generation_config = saved


def prefix_cache(model, prompt_ids, prompt_mask, group_size: int):
    """The KV cache of each prompt but its last token, computed once and copied ``group_size``
    times: (P, L − 1) prompts give a cache for P·G rows, rows i·G … i·G + G − 1 holding prompt
    i's.  Differentiable: the copies' gradients flow back into the one forward pass."""
    prefix_mask = prompt_mask[:, :-1]  # (P, L − 1)
    prefix = model(input_ids=prompt_ids[:, :-1], attention_mask=prefix_mask,
                   position_ids=position_ids_from_mask(prefix_mask), use_cache=True, logits_to_keep=1)
    if prefix.cache is None:  # a model in training mode with gradient checkpointing keeps no cache
        raise ValueError("a shared prefix needs the KV cache: turn gradient checkpointing off or run each row whole")
    prefix.cache.batch_repeat_interleave(group_size)  # (P·G, …)
    return prefix.cache


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompt_ids, prompt_mask, *, group_size, temperature, max_new_tokens, greedy=False,
    shared_prefill=False, top_k=0, top_p=1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``group_size`` completions per prompt from softmax(truncate_logits(logits / τ, top_k,
    top_p)) with the KV cache, rows grouped by prompt (defaults: no truncation, softmax(logits /
    τ)); ``greedy=True`` takes the arg-max token instead (then G must be 1).
    A LoRA policy samples with its adapter merged into its weights (``merged_lora``).

    ``shared_prefill=True`` runs each prompt (but its last token) through the model once and
    gives its G samples copies of that KV cache (``prefix_cache``), instead of letting
    ``generate`` prefill every prompt G times: the same distribution, a G-th of the prefill
    compute, and different random draws (and last-bit logits) than without it.

    Returns ``(completion_ids, completion_mask, truncated)``: (P·G, T), (P·G, T) and (P·G,),
    True where no EOS came within ``max_new_tokens`` (the completion was cut at the limit).
    """
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    with plain_generation_config(model, eos_ids, tokenizer.pad_token_id), merged_lora(model):
        cache = {}
        if shared_prefix_rows(model, group_size, shared_prefill) > 1 and prompt_ids.shape[1] > 1:
            cache = {"cache": prefix_cache(unwrap(model), prompt_ids, prompt_mask, group_size)}
            prompt_ids = prompt_ids.repeat_interleave(group_size, 0)
            prompt_mask = prompt_mask.repeat_interleave(group_size, 0)
            group_size = 1
        output = unwrap(model).generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, num_return_sequences=group_size,
            max_new_tokens=max_new_tokens, use_cache=True, **sampling, **cache,
        )  # (P·G, L + T)
    completion_ids = output[:, prompt_ids.shape[1] :]  # (P·G, T)
    has_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device)).any(-1)
    return completion_ids, completion_mask(completion_ids, eos_ids), ~has_eos


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: int | list[int]) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first EOS (any of ``eos_token_ids``),
    0 after it.  A completion without an EOS (cut at max_new_tokens) is kept whole."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))  # (N, T)
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before t
    return (eos_before == 0).long()  # (N, T)


def shared_prefix_rows(model, group_size: int, shared_prefill: bool) -> int:
    """How many consecutive rows share one prompt pass in ``model``'s forward passes right now:
    G = ``group_size`` when ``shared_prefill`` is on and the model keeps a KV cache in its current
    mode, else 1 (every row runs whole).  A model in training mode with gradient checkpointing
    keeps no cache; in eval mode (sampling, scoring) it does.  The one place this is decided."""
    checkpointing = getattr(unwrap(model), "is_activation_checkpointing", False)
    return group_size if shared_prefill and group_size > 1 and not (unwrap(model).training and checkpointing) else 1


def row_chunks(n: int, rows_per_pass: int | None, rows_per_prompt: int = 1) -> list[slice]:
    """``n`` rows cut into consecutive forward passes of at most ``rows_per_pass`` rows (None:
    one pass), each made of whole prompts' ``rows_per_prompt`` rows: ``rows_per_pass`` rounded
    down to a multiple of it, and at least one prompt's rows per pass."""
    step = max(rows_per_prompt, (rows_per_pass or n) // rows_per_prompt * rows_per_prompt)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                        rows_per_prompt=1, *, top_k=0, top_p=1.0):
    """Per-token log π(o_t | q, o_<t) and entropy at the completion positions, both (N, T),
    for the distribution the completions are sampled from: π = softmax(truncate_logits(logits / τ,
    top_k, top_p)), by default softmax(logits / τ).  A token outside the top-k / top-p set gets a
    finite log-prob (``logprobs.token_logprobs_and_entropy``), never −inf.

    One forward pass over [prompt, completion]; the logits that predict o_t sit one position
    earlier, so only the last T + 1 positions become logits (``logits_to_keep``), divided by τ in
    place.  All T + 1 are scored, the last (which predicts nothing) then dropped from the
    results: slicing the logits instead would make ``token_logprobs_and_entropy`` copy them.

    ``rows_per_prompt`` G > 1 says the rows are whole groups (rows i·G … i·G + G − 1 share prompt
    i; ``shared_prefix_rows`` decides): each prompt but its last token then runs once
    (``prefix_cache``) and only [last prompt token, completion] runs per row, with gradients
    through both.  The same function up to
    float rounding, for a fraction of the compute when prompts are long: (N/G)·(L − 1) + N·(T + 1)
    positions instead of N·(L + T).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, L = prompt_ids.shape
    if rows_per_prompt < 1 or n % rows_per_prompt:
        raise ValueError(f"rows_per_prompt must be ≥ 1 and divide the {n} rows, got {rows_per_prompt}")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, L + T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, L + T)
    position_ids = position_ids_from_mask(attention_mask)  # (N, L + T)
    start, cache = 0, {}
    if rows_per_prompt > 1 and L > 1:
        first = slice(None, None, rows_per_prompt)  # each group's first row
        cache = {"cache": prefix_cache(model, prompt_ids[first], prompt_mask[first], rows_per_prompt)}
        start = L - 1
    logits = model(
        input_ids=input_ids[:, start:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, start:],
        logits_to_keep=completion_ids.shape[1] + 1,
        use_cache=bool(cache),
        **cache,
    ).logits  # (N, T + 1, V), contiguous
    if temperature != 1.0:
        logits = logits.div_(temperature)
    targets = torch.nn.functional.pad(completion_ids, (0, 1))  # (N, T + 1): any id for the last
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, top_k=top_k, top_p=top_p)  # (N, T + 1) each
    return logprobs[:, :-1], entropy[:, :-1]  # (N, T), (N, T)


@torch.no_grad()
def score(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, rows_per_pass=None,
          rows_per_prompt=1, *, top_k=0, top_p=1.0):
    """log π(o_t | q, o_<t), (N, T), float32 (float64 for a float64 model), without gradients, of
    the law ``completion_logprobs`` scores (τ, top-k, top-p), ``rows_per_pass`` sequences per
    forward pass (None: all at once), so the scoring passes never hold logits for all N rows.
    ``rows_per_prompt`` > 1: rows are whole groups and each prompt runs once
    (``completion_logprobs``); a pass then holds whole groups (``row_chunks``)."""
    parts = [
        completion_logprobs(model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows],
                            temperature, rows_per_prompt, top_k=top_k, top_p=top_p)[0]
        for rows in row_chunks(completion_ids.shape[0], rows_per_pass, rows_per_prompt)
    ]  # fmt: skip
    return torch.cat(parts)  # (N, T)


def select_groups(batch: Rollout, groups: list[int], group_size: int) -> Rollout:
    """The rows of the given groups (group g is rows g·G … g·G + G − 1), in that order."""
    rows = torch.tensor([g * group_size + j for g in groups for j in range(group_size)], dtype=torch.long)

    def take(x):
        return None if x is None else x[rows.to(x.device)]

    return Rollout(
        prompt_ids=take(batch.prompt_ids), prompt_mask=take(batch.prompt_mask),
        completion_ids=take(batch.completion_ids), completion_mask=take(batch.completion_mask),
        truncated=take(batch.truncated), old_logprobs=take(batch.old_logprobs), ref_logprobs=take(batch.ref_logprobs),
        completions=[batch.completions[i] for i in rows.tolist()], answers=[batch.answers[i] for i in rows.tolist()],
        rollout_logprobs=take(batch.rollout_logprobs),
    )


def concat_rollouts(batches: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout from several: prompts left-padded and completions right-padded to the longest
    (padding: ``pad_token_id``, mask 0, log-probs 0), rows in order."""
    L = max(b.prompt_ids.shape[1] for b in batches)
    T = max(b.completion_ids.shape[1] for b in batches)

    def pad(x, width, left, value):
        if x is None:
            return None
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    def cat(name, width, left, value):
        parts = [pad(getattr(b, name), width, left, value) for b in batches]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return Rollout(
        prompt_ids=cat("prompt_ids", L, True, pad_token_id), prompt_mask=cat("prompt_mask", L, True, 0),
        completion_ids=cat("completion_ids", T, False, pad_token_id), completion_mask=cat("completion_mask", T, False, 0),
        truncated=torch.cat([b.truncated for b in batches]),
        old_logprobs=cat("old_logprobs", T, False, 0.0), ref_logprobs=cat("ref_logprobs", T, False, 0.0),
        completions=[c for b in batches for c in b.completions], answers=[a for b in batches for a in b.answers],
        rollout_logprobs=cat("rollout_logprobs", T, False, 0.0),
    )


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
    rows_per_pass: int | None = None,
    shared_prefill: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    sampler=None,
) -> Rollout:
    """Sample a group of ``group_size`` completions for each example's prompt and score them.

    Tokens are drawn from softmax(truncate_logits(logits / τ, top_k, top_p)) (the defaults: no
    truncation) and every log-prob is of that same law.  Old log-probs come from ``model``
    (π_θold = π_θ at sampling time) and reference log-probs from ``ref_model``, ``rows_per_pass``
    sequences per forward pass.  ``score_old=False`` skips the old pass and leaves
    ``old_logprobs`` None, for a trainer whose only update runs at θ = θ_old and takes them from
    its own forward pass.  ``shared_prefill``: each prompt runs once per group, in sampling
    (``sample_completions``) and in the scoring passes (``completion_logprobs``).

    ``sampler``: another model (a copy of the policy, in another dtype or some updates old, on
    ``model``'s device), the inference engine: it draws the tokens and scores them, in its own
    dtype, as ``rollout_logprobs`` (float32); ``model`` still scores ``old_logprobs``.  None: the
    policy samples itself, ``rollout_logprobs`` is None.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be ≥ 1, got {group_size}")
    drawer = model if sampler is None else sampler
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [ex["prompt"] for ex in examples], model_device(model))
    completion_ids, mask, truncated = sample_completions(
        drawer, tokenizer, prompt_ids, prompt_mask,
        group_size=group_size, temperature=temperature, max_new_tokens=max_new_tokens,
        shared_prefill=shared_prefill, top_k=top_k, top_p=top_p,
    )  # (N, T), (N, T), (N,)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)  # (N, L)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)  # (N, L)
    def score_with(scorer):
        return score(scorer, prompt_ids, prompt_mask, completion_ids, mask, temperature, rows_per_pass,
                     shared_prefix_rows(scorer, group_size, shared_prefill), top_k=top_k, top_p=top_p)

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        truncated=truncated,
        old_logprobs=score_with(unwrap(model)) if score_old else None,
        ref_logprobs=None if ref_model is None else score_with(ref_model),
        completions=decode_completions(tokenizer, completion_ids, mask),
        answers=[ex["answer"] for ex in examples for _ in range(group_size)],
        rollout_logprobs=None if sampler is None else score_with(unwrap(sampler)),
    )


@torch.no_grad()
def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> tuple[list[str], list[bool]]:
    """Arg-max completions, one per prompt, as text, and whether each was cut at the limit."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, model_device(model))
    completion_ids, mask, truncated = sample_completions(
        model, tokenizer, prompt_ids, prompt_mask,
        group_size=1, temperature=1.0, max_new_tokens=max_new_tokens, greedy=True,
    )
    return decode_completions(tokenizer, completion_ids, mask), truncated.tolist()


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy (arg-max) completions, one per prompt, as text: the same as decoding each prompt
    alone without padding."""
    return greedy_decode(model, tokenizer, prompts, max_new_tokens)[0]
