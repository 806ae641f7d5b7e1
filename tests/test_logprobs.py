"""minigrpo.logprobs: per-token log-probs and entropies against the naive formulas."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import minigrpo.logprobs as logprobs_module
from minigrpo.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Force several chunks (and a ragged last one) on the tiny test tensors."""
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", 20)


def naive(logits, tokens):
    """log π(token) = log_softmax(x)[token];  H = −Σ softmax(x) · log_softmax(x)."""
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), -(torch.softmax(logits, -1) * logp).sum(-1)


@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7), (2, 3, 4, 11)])
def test_matches_naive_float64(shape):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g)
    want_lp, want_h = naive(logits, tokens)
    lp, h = token_logprobs_and_entropy(logits, tokens)
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, want_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(token_logprobs(logits, tokens), want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(token_entropy(logits), want_h, rtol=0, atol=1e-12)
    assert lp.shape == h.shape == shape[:-1]


def test_matches_naive_gradients():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 9, (3, 4), generator=g)
    w1, w2 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    lp, h = token_logprobs_and_entropy(logits, tokens)
    got = torch.autograd.grad((w1 * lp + w2 * h).sum(), logits)[0]
    lp, h = naive(logits, tokens)
    want = torch.autograd.grad((w1 * lp + w2 * h).sum(), logits)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs_and_entropy(x, tokens), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens), (logits,))
    assert torch.autograd.gradcheck(token_entropy, (logits,))


def test_dtype_rule():
    logits = torch.randn(2, 3, 6)
    tokens = torch.randint(0, 6, (2, 3))
    for dtype, out_dtype in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                             (torch.float32, torch.float32), (torch.float64, torch.float64)]:  # fmt: skip
        x = logits.to(dtype).detach().requires_grad_()
        lp, h = token_logprobs_and_entropy(x, tokens)
        assert lp.dtype == h.dtype == out_dtype
        (lp.sum() + h.sum()).backward()
        assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_extreme_logits_are_finite(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (1e4 * torch.randn(4, 5, 13, generator=g).sign()).to(dtype)
    if dtype == torch.float16:  # float16 tops out at 65504; ±1e4 still fits
        assert torch.isfinite(logits).all()
    logits.requires_grad_()
    tokens = torch.randint(0, 13, (4, 5), generator=g)
    lp, h = token_logprobs_and_entropy(logits, tokens)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    assert (h >= 0).all() and (lp <= 0).all()
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    want_lp, want_h = naive(logits.detach().double(), tokens)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(h.double(), want_h, rtol=1e-6, atol=1e-3)


def test_bf16_matches_float32_of_the_same_values():
    logits = torch.randn(3, 8, 50).bfloat16()
    tokens = torch.randint(0, 50, (3, 8))
    lp, h = token_logprobs_and_entropy(logits, tokens)
    want_lp, want_h = naive(logits.float(), tokens)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)


def test_minus_inf_logits():
    """Masked vocabulary entries (−inf) have probability 0 and add nothing, not nan."""
    finite = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    ninf = torch.full((2, 2), float("-inf"), dtype=torch.float64)
    logits = torch.cat([finite[:, :1], ninf[:, :1], finite[:, 1:], ninf[:, 1:]], dim=1).requires_grad_()
    tokens = torch.tensor([0, 2])  # column 2 of logits is finite[:, 1]
    lp, h = token_logprobs_and_entropy(logits, tokens)
    want_lp, want_h = naive(finite, torch.tensor([0, 1]))
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(h, want_h)
    (lp.sum() + 1e6 * h.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, [1, 4]] == 0).all()
    x = finite.clone().requires_grad_()
    want_lp, want_h = naive(x, torch.tensor([0, 1]))
    (want_lp.sum() + 1e6 * want_h.sum()).backward()
    torch.testing.assert_close(logits.grad[:, [0, 2, 3]], x.grad)


def test_certain_token_has_zero_entropy():
    logits = torch.tensor([[1e4, -1e4, -1e4]])
    lp, h = token_logprobs_and_entropy(logits, torch.tensor([0]))
    assert lp.item() == 0.0 and h.item() == 0.0 and not torch.signbit(h).item()


def test_non_contiguous_and_empty():
    logits = torch.randn(6, 4, dtype=torch.float64).t()  # (4, 6), non-contiguous
    tokens = torch.randint(0, 6, (4,))
    torch.testing.assert_close(token_logprobs_and_entropy(logits, tokens), naive(logits, tokens))
    lp, h = token_logprobs_and_entropy(torch.randn(0, 3, 5), torch.zeros(0, 3, dtype=torch.long))
    assert lp.shape == h.shape == (0, 3)


def test_only_used_outputs_need_gradients():
    logits = torch.randn(3, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (3,))
    lp, _ = token_logprobs_and_entropy(logits, tokens)
    lp.sum().backward()
    torch.testing.assert_close(logits.grad, torch.nn.functional.one_hot(tokens, 5) - torch.softmax(logits, -1))


@pytest.mark.parametrize(
    "logits, tokens, match",
    [
        (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), "tokens"),
        (torch.randn(2, 3, 5), torch.zeros(3, 2, dtype=torch.long), "tokens"),
        (torch.randn(2, 3, 5), torch.full((2, 3), 5), "tokens"),
        (torch.randn(2, 3, 5), torch.full((2, 3), -1), "tokens"),
        (torch.randn(2, 3, 5), torch.zeros(2, 3), "tokens"),
        (torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), "logits"),
        (torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), "logits"),
    ],
)
def test_bad_inputs(logits, tokens, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs_and_entropy(logits, tokens)
    with pytest.raises(ValueError, match=match):
        token_logprobs(logits, tokens)


def test_token_logprobs_needs_tokens():
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(torch.randn(2, 3), None)
    with pytest.raises(ValueError, match="logits"):
        token_entropy([[0.0, 1.0]])


# ---------------------------------------------------------------- top-k / top-p truncation


def warped(logits, top_k, top_p):
    """transformers' own warpers, in generate's order (top-k, then top-p), min_tokens_to_keep = 1."""
    flat = logits.reshape(-1, logits.shape[-1])
    if top_k:
        flat = TopKLogitsWarper(top_k)(None, flat)
    if top_p < 1:
        flat = TopPLogitsWarper(top_p)(None, flat)
    return flat.view(logits.shape)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (3, 1.0), (40, 1.0), (0, 0.8), (0, 0.3), (0, 0.05),
                                          (4, 0.8), (2, 0.99)])
def test_truncate_logits_keeps_the_tokens_transformers_keeps(top_k, top_p):
    """The same kept set as ``TopKLogitsWarper`` / ``TopPLogitsWarper`` on logits full of ties
    (rounded to halves: equal values at the top-k boundary are all kept), k > V included."""
    g = torch.Generator().manual_seed(4)
    logits = (2 * torch.randn(50, 3, 12, generator=g)).round() / 2
    got = logprobs_module.truncate_logits(logits, top_k, top_p)
    assert torch.equal(got, warped(logits, top_k, top_p))
    assert torch.isfinite(got).any(-1).all()  # at least one token always stays
    if top_k == 0 and top_p == 1.0:
        assert got is logits  # no truncation, no copy


def naive_truncated(logits, tokens, top_k, top_p):
    """log π and H of softmax(truncate(x)), the plain way (−inf outside the kept set)."""
    logp = torch.log_softmax(warped(logits, top_k, top_p), -1)
    p = logp.exp()
    return logp.gather(-1, tokens[..., None]).squeeze(-1), -(p * logp.clamp(min=-1e4)).sum(-1)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.7), (5, 0.9)])
def test_truncated_logprobs_entropy_and_gradients_match_naive(top_k, top_p):
    """Kept tokens: log π and H of the truncated, renormalised law, gradients as the naive code's
    (float64); the chunked pass gets the same values in float32 as in float64 up to rounding."""
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(4, 6, 11, generator=g, dtype=torch.float64)).requires_grad_()
    kept = torch.isfinite(warped(logits.detach(), top_k, top_p))  # (4, 6, 11)
    tokens = torch.multinomial(kept.view(-1, 11).double(), 1, generator=g).view(4, 6)  # kept tokens only
    w1, w2 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    lp, h = token_logprobs_and_entropy(logits, tokens, top_k=top_k, top_p=top_p)
    got = torch.autograd.grad((w1 * lp + w2 * h).sum(), logits)[0]
    want_lp, want_h = naive_truncated(logits, tokens, top_k, top_p)
    want = torch.autograd.grad((w1 * want_lp + w2 * want_h).sum(), logits)[0]
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, want_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got[~kept] == 0).all()  # a truncated logit has no say in the truncated law
    torch.testing.assert_close(token_logprobs(logits, tokens, top_k=top_k, top_p=top_p), want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(token_entropy(logits, top_k=top_k, top_p=top_p), want_h, rtol=0, atol=1e-12)
    lp32, h32 = token_logprobs_and_entropy(logits.detach().float(), tokens, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(lp32.double(), want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(h32.double(), want_h, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_a_token_outside_the_kept_set_is_finite(dtype):
    """A token the truncation drops (π = 0) gets log π(top) − (x_top − x_o), not −inf: finite,
    below every kept token's log-prob, with the gradient onehot(o) − π of the truncated π."""
    logits = torch.tensor([[4.0, 3.0, 1.0, -2.0, 0.5]], dtype=dtype).requires_grad_()
    tokens = torch.tensor([3])  # far outside top-2
    lp, h = token_logprobs_and_entropy(logits, tokens, top_k=2)
    x = logits.detach().double()[0]
    kept = torch.log_softmax(x[:2], -1)  # the truncated law over tokens 0 and 1
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    assert lp.item() == pytest.approx((kept[0] - (x[0] - x[3])).item(), abs=1e-5)
    assert lp.item() < kept.min().item()
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    p = torch.cat([kept.exp(), torch.zeros(3, dtype=torch.float64)])
    onehot = torch.nn.functional.one_hot(tokens, 5)[0].double()
    dh = -p * (torch.cat([kept, torch.zeros(3, dtype=torch.float64)]) + h.detach().double())
    torch.testing.assert_close(logits.grad[0].double(), onehot - p + dh, rtol=0, atol=1e-2 if dtype == torch.bfloat16
                               else 1e-6)


def test_truncation_gradcheck_float64():
    """Away from the nucleus boundary the truncated log-prob and entropy are smooth: gradcheck,
    kept and dropped tokens alike."""
    g = torch.Generator().manual_seed(6)
    logits = (2 * torch.randn(2, 3, 7, generator=g, dtype=torch.float64)).requires_grad_()
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    for k, p in ((3, 1.0), (0, 0.6)):
        def f(x, k=k, p=p):
            return token_logprobs_and_entropy(x, tokens, top_k=k, top_p=p)

        assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("top_k, top_p", [(-1, 1.0), (2.0, 1.0), (True, 1.0), (0, 0.0), (0, 1.5), (0, "0.9")])
def test_bad_truncation(top_k, top_p):
    with pytest.raises(ValueError, match="top_k" if top_p == 1.0 else "top_p"):
        token_logprobs_and_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), top_k=top_k, top_p=top_p)
    with pytest.raises(ValueError, match="top_k" if top_p == 1.0 else "top_p"):
        logprobs_module.truncate_logits(torch.randn(2, 5), top_k, top_p)
