"""Rollouts: masks end at the first EOS, groups are consecutive, log-probs match a direct pass."""

import pytest
import torch

from minigrpo.logprobs import token_logprobs
from minigrpo.rollout import completion_logprobs, completion_mask, decode_completions, greedy_completions, position_ids_from_mask, rollout
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
EXAMPLES = [
    {"prompt": "1+2=", "answer": "3"},
    {"prompt": "45+67=", "answer": "112"},
    {"prompt": "9+90=", "answer": "99"},
]


def small_world(seed=0):
    tokenizer = build_tokenizer()
    return build_model(tokenizer, SMALL, seed=seed), tokenizer


def test_completion_mask_ends_at_and_includes_the_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, 0, 0], [eos, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, eos, 7, eos, 0]])
    expected = [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert completion_mask(ids, eos).tolist() == expected


def test_position_ids_start_at_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_rollout_shapes_masks_and_groups():
    model, tokenizer = small_world()
    torch.manual_seed(0)
    G = 4
    batch = rollout(model, tokenizer, EXAMPLES, group_size=G, max_new_tokens=6)
    N, T = batch.completion_ids.shape
    assert N == len(EXAMPLES) * G and T <= 6
    for name in ("completion_mask", "old_logprobs", "entropy"):
        assert getattr(batch, name).shape == (N, T)
    assert batch.ref_logprobs is None
    # groups are consecutive: rows i*G ... i*G+G-1 share prompt i
    for i, ex in enumerate(EXAMPLES):
        prompts = {tokenizer.decode(p[m.bool()], skip_special_tokens=True) for p, m in zip(
            batch.prompt_ids[i * G:(i + 1) * G], batch.prompt_mask[i * G:(i + 1) * G])}
        assert prompts == {ex["prompt"]}
        assert batch.answers[i * G:(i + 1) * G] == [ex["answer"]] * G
    # the mask ends at the first EOS (included) and is zero after it
    eos = tokenizer.eos_token_id
    for ids, mask in zip(batch.completion_ids, batch.completion_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[: n - 1] != eos).all()
        assert ids[n - 1] == eos or n == T
    # log-probs are zero-free on completion tokens, finite everywhere, ≤ 0
    assert torch.isfinite(batch.old_logprobs).all() and (batch.old_logprobs <= 0).all()
    assert batch.completions == decode_completions(tokenizer, batch.completion_ids, batch.completion_mask)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_rollout_logprobs_equal_a_direct_computation(temperature):
    """Old and reference log-probs are log softmax(logits / τ): the distribution sampled from."""
    model, tokenizer = small_world()
    ref, _ = small_world(seed=1)
    torch.manual_seed(1)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=3, max_new_tokens=5, ref_model=ref,
                    temperature=temperature)
    for i in range(batch.completion_ids.shape[0]):  # one unpadded sequence at a time
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        completion = batch.completion_ids[i][batch.completion_mask[i].bool()]
        ids = torch.cat([prompt, completion]).unsqueeze(0)
        with torch.no_grad():
            for m, got in ((model, batch.old_logprobs), (ref, batch.ref_logprobs)):
                logits = m(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (n, V)
                expected = token_logprobs(logits / temperature, completion)
                torch.testing.assert_close(got[i, : len(completion)], expected, atol=1e-5, rtol=1e-5)


def test_completion_logprobs_rejects_a_temperature_that_is_not_positive():
    model, tokenizer = small_world()
    batch = rollout(model, tokenizer, EXAMPLES[:1], group_size=1, max_new_tokens=2)
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, *args, temperature=0.0)


def test_rollout_is_reproducible_under_a_seed():
    model, tokenizer = small_world()
    torch.manual_seed(7)
    a = rollout(model, tokenizer, EXAMPLES, group_size=2)
    torch.manual_seed(7)
    b = rollout(model, tokenizer, EXAMPLES, group_size=2)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_greedy_completions_match_greedy_decoding_by_hand():
    model, tokenizer = small_world()
    texts = greedy_completions(model, tokenizer, [ex["prompt"] for ex in EXAMPLES], max_new_tokens=4)
    for text, ex in zip(texts, EXAMPLES):
        ids = tokenizer(ex["prompt"], return_tensors="pt")["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(4):
                token = model(input_ids=ids).logits[0, -1].argmax()
                if token == tokenizer.eos_token_id:
                    break
                out.append(int(token))
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
        assert text == tokenizer.decode(out, skip_special_tokens=True)
