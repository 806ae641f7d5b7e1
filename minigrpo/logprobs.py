"""Per-token log-probabilities and entropies from logits, without a [..., V] copy.

A language model's last layer gives logits x ∈ R^V at every position.  GRPO needs two numbers
per position:

    log π(o_t | q, o_<t) = x_{o_t} − log Σ_v exp x_v          (the sampled token's log-prob)
    H(π(· | q, o_<t))   = −Σ_v π_v log π_v                   (the entropy of the next-token law)

The obvious code, ``log_softmax(x).gather(-1, tokens)``, materialises a float32 copy of the
whole [B, T, V] tensor (1.16 GiB for 4 × 512 × 151,936 Qwen logits in float32), and its backward two more.
Here one ``torch.autograd.Function`` walks over the rows in chunks of a few MB: the forward
keeps only a reference to the logits and one float per row; the backward recomputes the softmax
chunk by chunk.  Extra memory is a few chunks, whatever the sequence length.

Precision rule: every reduction runs in float32 (float64 when the logits are float64), and the
results come back in that dtype — float32 for bfloat16/float16/float32 logits, float64 for
float64 logits.  The gradient comes back in the logits' dtype.

Top-k / top-p sampling draws from a truncated, renormalised law, and every log-prob and entropy
of the objective must then be of that law too (else ρ ≠ 1 at θ = θ_old): ``truncate_logits``
keeps the tokens transformers' ``TopKLogitsWarper`` and ``TopPLogitsWarper`` keep, and the
functions here take ``top_k`` / ``top_p`` and apply it chunk by chunk (defaults: no truncation).

Run ``python benchmarks/logprobs_memory.py`` to measure the memory and time against the naive
code.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**22
"""Logits per chunk (16 MiB in float32; a chunk's float32 temporaries are 2 to 4 of these).
Large enough that the per-chunk overhead stays small even on a busy 2-core CPU, small enough to
stay far below 0.1 × the logits of a long-vocabulary batch.  Tuned with
``benchmarks/logprobs_memory.py``."""


LOG_ZERO = -1e4
"""Floor for log π in products with π: exp(−1e4) is exactly 0 in float32 and float64, so the floor
changes no term, and turns 0 · (−inf) (a −inf logit) into 0 instead of nan."""


def truncate_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The logits with every token outside the top-k, then the top-p, set to −inf (a copy; the
    logits themselves when ``top_k`` = 0 and ``top_p`` = 1: no truncation).  Apply it after
    dividing by τ; softmax of the result is the law ``generate(top_k=k, top_p=p)`` samples from.

    The kept set is exactly transformers' (``TopKLogitsWarper``, then ``TopPLogitsWarper``, with
    ``min_tokens_to_keep`` = 1), computed by the same operations:

    - top-k: keep x_v ≥ the k-th largest logit (every token tied with it too), k = 0: all;
    - top-p: sort ascending, drop the tokens whose cumulative softmax is ≤ 1 − p (the smallest
      ones, whose mass together is at most 1 − p), always keeping the largest; p = 1: all.
    """
    check_truncation(top_k, top_p)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1:
        ascending, order = torch.sort(logits, descending=False)  # (..., V) each
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # (..., V), in sorted order
        drop[..., -1:] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; bfloat16, float16 and float32 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _log_softmax_chunks(logits: torch.Tensor, top_k: int, top_p: float):
    """Walk over the rows of ``logits`` (R, V) in chunks.  Yields (start, stop, logp, spare):
    logp = log_softmax of rows start:stop, truncated (``truncate_logits``), in the compute dtype,
    and spare, a scratch tensor of the same shape.  Both are views of two buffers allocated once,
    so the extra memory is two chunks (and, when truncating, the sort's of one)."""
    dtype = _compute_dtype(logits.dtype)
    rows, vocab = logits.shape
    step = min(_chunk_rows(vocab), max(rows, 1))
    buffers = logits.new_empty((2, step, vocab), dtype=dtype)  # (2, r, V)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        spare, logp = buffers[0, : stop - start], buffers[1, : stop - start]  # (r, V) each
        x = logits[start:stop]
        if x.dtype != dtype:
            x = spare.copy_(x)  # upcast; spare is free again once logp is computed
        torch.log_softmax(truncate_logits(x, top_k, top_p), dim=-1, out=logp)
        yield start, stop, logp, spare


def _entropy_from_log_softmax(logp: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v π_v log π_v; overwrites ``logp`` and ``spare``.  A −inf logit has π_v = 0 and
    adds 0 (not nan)."""
    p = torch.exp(logp, out=spare)  # (r, V)
    logp.clamp_(min=LOG_ZERO)  # 0 · (−inf) → 0 · LOG_ZERO = 0
    return 0.0 - p.mul_(logp).sum(-1)  # (r,); 0 − s, not −s, so a certain token gives +0


def _outside_logprob(x: torch.Tensor, logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Stand-in log π̃(o) for tokens o outside the kept set: log π(top) − (x_top − x_o)
    = x_o − log Σ_kept exp x (x_top − log π(top) is log Σ_kept exp x), o's logit measured against
    the kept set's normaliser.  Not the log-prob o would get were it kept: that would also add
    exp x_o to the normaliser.  Finite, ≤ the least kept token's log-prob, and continuous in x:
    its gradient is onehot(o) − π, the same formula as a kept token's.  ``x`` (r, V) the logits
    as scored (already divided by any temperature), untruncated; ``logp`` (r, V) the truncated
    log-softmax, ``tokens`` (r, 1) → (r,)."""
    top = logp.argmax(-1, keepdim=True)  # (r, 1): a kept token of the largest logit
    gap = x.gather(-1, top).to(logp.dtype) - x.gather(-1, tokens).to(logp.dtype)  # (r, 1)
    return (logp.gather(-1, top) - gap).squeeze(-1)


class _TokenLogprobsEntropy(torch.autograd.Function):
    """Fused, chunked log π(token) and H(π) over rows of logits (R, V), π = softmax of the
    truncated logits (``truncate_logits``; all of them by default).

    A token outside the kept set has π = 0; its log-prob is the finite ``_outside_logprob``
    instead of −inf, so ratios, KL estimates and their gradients stay finite.

    Backward, with π = softmax(truncate(x)) (0 outside the kept set):
        ∂ log π_token / ∂x = onehot(token) − π
        ∂ H / ∂x          = −π ⊙ (log π + H)
    """

    @staticmethod
    def forward(ctx, logits, tokens, want_entropy, top_k, top_p):  # logits (R, V), tokens (R,) or None
        ctx.set_materialize_grads(False)
        ctx.truncation = top_k, top_p
        dtype = _compute_dtype(logits.dtype)
        rows = logits.shape[0]
        logprobs = None if tokens is None else logits.new_empty(rows, dtype=dtype)  # (R,)
        entropy = logits.new_empty(rows, dtype=dtype) if want_entropy else None  # (R,)
        for start, stop, logp, spare in _log_softmax_chunks(logits, top_k, top_p):
            if tokens is not None:
                token = tokens[start:stop, None]  # (r, 1)
                chosen = logp.gather(-1, token).squeeze(-1)  # (r,); −inf outside the kept set
                if top_k or top_p < 1:
                    x = logits[start:stop]
                    chosen = torch.where(torch.isneginf(chosen), _outside_logprob(x, logp, token), chosen)
                logprobs[start:stop] = chosen
            if want_entropy:
                entropy[start:stop] = _entropy_from_log_softmax(logp, spare)
        ctx.save_for_backward(logits, tokens, entropy)  # references, no copies
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):  # (R,) or None each
        logits, tokens, entropy = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        dtype = _compute_dtype(logits.dtype)
        grad_logits = torch.empty_like(logits)  # (R, V)
        for start, stop, logp, spare in _log_softmax_chunks(logits, *ctx.truncation):  # logp (r, V)
            p = torch.exp(logp, out=spare)  # (r, V)
            g_lp = None if grad_logprobs is None else grad_logprobs[start:stop, None].to(dtype)  # (r, 1)
            if grad_entropy is None:
                coef = g_lp
            else:  # coef = g_lp + g_H · (log π + H), in place in logp
                g_h = grad_entropy[start:stop, None].to(dtype)  # (r, 1)
                coef = logp.clamp_(min=LOG_ZERO).add_(entropy[start:stop, None]).mul_(g_h)
                if g_lp is not None:
                    coef.add_(g_lp)
            grad = p.mul_(coef).neg_()  # −π ⊙ coef
            if g_lp is not None:
                grad.scatter_add_(-1, tokens[start:stop, None], g_lp)  # + g_lp · onehot(token)
            grad_logits[start:stop] = grad
        return grad_logits, None, None, None, None


def _validate(logits: torch.Tensor, tokens: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape [..., V]")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got {tuple(logits.shape)}")
    if tokens is None:
        return
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError("tokens must be an integer tensor of token ids")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )
    if tokens.numel() and (tokens.min().item() < 0 or tokens.max().item() >= logits.shape[-1]):
        raise ValueError(f"tokens must be ids in [0, {logits.shape[-1]}) (the logits' last dim)")


def check_truncation(top_k, top_p) -> None:
    """The top-k / top-p settings (``truncate_logits``'s, ``GRPOConfig``'s, same names): k an int
    ≥ 0 (0: off), p a number in (0, 1] (1: off); ``ValueError`` naming the argument otherwise."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int ≥ 0 (0: off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1: off), got {top_p!r}")


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor | None, *, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-position log π(token) and entropy H(π) in one chunked pass over the logits.

        log π(o_t | q, o_<t) = x̃_{o_t} − log Σ_v exp x̃_v
        H(π(· | q, o_<t))   = −Σ_v π_v log π_v,   π = softmax(x̃),  x̃ = truncate_logits(x, top_k, top_p)

    With the defaults x̃ = x.  A token outside the kept set (π = 0: possible once θ has moved
    since the token was sampled) gets a finite log-prob, log π(top) − (x_top − x_o), what the
    renormalised softmax would give it were it kept, not −inf.

    Args:
        logits: [..., V] floating point (any of bfloat16, float16, float32, float64), already
            divided by τ; −inf entries (masked vocabulary) are allowed.
        tokens: [...] integer ids in [0, V) with shape ``logits.shape[:-1]``, or None to compute
            the entropy only.
        top_k, top_p: the truncation (``truncate_logits``): 0 and 1.0 are off.
    Returns:
        (logprobs [...] or None, entropy [...]), float32 (float64 for float64 logits).
        Both are differentiable; the extra memory is a few MB, never a copy of the logits.
    """
    _validate(logits, tokens)
    check_truncation(top_k, top_p)
    vocab = logits.shape[-1]
    flat_tokens = None if tokens is None else tokens.reshape(-1).long()  # (R,)
    logprobs, entropy = _TokenLogprobsEntropy.apply(logits.reshape(-1, vocab), flat_tokens, True, top_k, top_p)
    batch_shape = logits.shape[:-1]
    return (None if logprobs is None else logprobs.view(batch_shape)), entropy.view(batch_shape)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log π(o_t | q, o_<t) = x̃_{o_t} − log Σ_v exp x̃_v, x̃ = truncate_logits(x, top_k, top_p),
    for every position (outside the kept set: see ``token_logprobs_and_entropy``).

    ``logits`` [..., V], ``tokens`` [...] → [...], float32 (float64 for float64 logits).
    Chunked: never materialises a [..., V] log-softmax (see the module docstring).
    """
    if tokens is None:
        raise ValueError("tokens must be given (use token_entropy for the entropy alone)")
    _validate(logits, tokens)
    check_truncation(top_k, top_p)
    vocab = logits.shape[-1]
    flat_tokens = tokens.reshape(-1).long()  # (R,)
    logprobs, _ = _TokenLogprobsEntropy.apply(logits.reshape(-1, vocab), flat_tokens, False, top_k, top_p)
    return logprobs.view(logits.shape[:-1])


def token_entropy(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """H(π) = −Σ_v π_v log π_v with π = softmax(truncate_logits(x, top_k, top_p)), for every
    position.

    ``logits`` [..., V] → [...], float32 (float64 for float64 logits).  −inf logits contribute 0.
    """
    return token_logprobs_and_entropy(logits, None, top_k=top_k, top_p=top_p)[1]
