"""Rollouts: masks end at the first EOS, groups are consecutive, log-probs match a direct pass."""

import pytest
import torch

from minigrpo.logprobs import token_logprobs, truncate_logits
from minigrpo.losses import grpo_loss
from minigrpo.models import Sampler, prepare_for_training
from minigrpo.rollout import (
    completion_logprobs,
    completion_mask,
    concat_rollouts,
    decode_completions,
    eos_token_ids,
    greedy_completions,
    merged_lora,
    position_ids_from_mask,
    rollout,
    sample_completions,
    score,
    select_groups,
    tokenize_prompts,
)
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
    assert completion_mask(ids, [eos, 7]).tolist()[3] == [1, 1, 0, 0, 0]  # any of several EOS ids


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
    for name in ("completion_mask", "old_logprobs"):
        assert getattr(batch, name).shape == (N, T)
    assert batch.ref_logprobs is None and batch.truncated.shape == (N,)
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
    assert batch.truncated.tolist() == [bool((ids != eos).all()) for ids in batch.completion_ids]
    # log-probs are zero-free on completion tokens, finite everywhere, ≤ 0
    assert torch.isfinite(batch.old_logprobs).all() and (batch.old_logprobs <= 0).all()
    assert batch.completions == decode_completions(tokenizer, batch.completion_ids, batch.completion_mask)


@pytest.mark.parametrize("rows_per_pass", [None, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_rollout_logprobs_equal_a_direct_computation(temperature, rows_per_pass):
    """Old and reference log-probs are log softmax(logits / τ): the distribution sampled from,
    scored all at once or a few rows per pass."""
    model, tokenizer = small_world()
    ref, _ = small_world(seed=1)
    torch.manual_seed(1)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=3, max_new_tokens=5, ref_model=ref,
                    temperature=temperature, rows_per_pass=rows_per_pass)
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


def hostile(model):
    """A checkpoint whose generation_config would change what is sampled if it were inherited."""
    config = model.generation_config
    config.do_sample, config.temperature, config.top_k, config.top_p = True, 0.3, 2, 0.5
    config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 1
    config.min_new_tokens, config.suppress_tokens = 3, [4]
    return model


@pytest.mark.parametrize("lora", [False, True])
def test_samples_follow_softmax_over_temperature_whatever_the_generation_config(lora):
    """First-token frequencies over 4,000 samples match softmax(logits / τ) (4σ ≤ 0.03), though
    the checkpoint asks for top-k 2, a repetition penalty, an n-gram ban and suppressed tokens;
    also through a peft LoRA wrapper, whose generate runs on the base model."""
    model, tokenizer = small_world()
    config = hostile(model).generation_config
    if lora:
        model = prepare_for_training(model, lora_rank=2)  # B = 0: the same logits
    tau, n = 1.3, 4000
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["1+2="])
    torch.manual_seed(0)
    ids, _, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=n,
                                   temperature=tau, max_new_tokens=1)
    frequencies = torch.bincount(ids[:, 0], minlength=len(tokenizer)) / n
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=prompt_ids).logits[0, -1] / tau, -1)
    assert (frequencies - expected).abs().max() < 0.03
    assert (frequencies > 0).sum() > 2  # top-k 2 was not applied
    assert (model.get_base_model() if lora else model).generation_config is config  # restored


def test_generation_stops_on_every_declared_eos():
    model, tokenizer = small_world()
    plus = tokenizer.convert_tokens_to_ids("+")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, plus]
    assert eos_token_ids(model, tokenizer) == sorted([tokenizer.eos_token_id, plus])
    torch.manual_seed(0)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=8, max_new_tokens=8, temperature=2.0)
    ends = [int(m.sum()) for m in batch.completion_mask]
    for ids, n in zip(batch.completion_ids.tolist(), ends):
        assert not {tokenizer.eos_token_id, plus} & set(ids[: n - 1])
    assert any(ids[n - 1] == plus for ids, n in zip(batch.completion_ids.tolist(), ends))


def argmax_by_hand(model, ids, steps, eos=None):
    """Arg-max decoding of one unpadded prompt (1, L), a full forward pass per token, without
    the KV cache or ``generate``: up to ``steps`` token ids, stopping before ``eos``."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[0, -1].argmax()
            if token == eos:
                break
            out.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_greedy_completions_match_greedy_decoding_by_hand():
    """Batched, left-padded greedy decoding equals arg-max decoding of each prompt alone, even
    with a hostile generation_config on the checkpoint."""
    model, tokenizer = small_world()
    hostile(model)
    texts = greedy_completions(model, tokenizer, [ex["prompt"] for ex in EXAMPLES], max_new_tokens=4)
    for text, ex in zip(texts, EXAMPLES):
        ids = tokenizer(ex["prompt"], return_tensors="pt")["input_ids"]
        out = argmax_by_hand(model, ids, 4, eos=tokenizer.eos_token_id)
        assert text == tokenizer.decode(out, skip_special_tokens=True)


def test_shared_prefill_samples_the_same_distribution():
    """Prefilling each prompt once and copying its cache to the G samples changes the random
    draws, not the law: first-token frequencies still match softmax(logits / τ), and the
    second token's frequencies match those of plain sampling (the copies carry the context).
    On this near-uniform model a cache from the wrong prompt passes too: the exact tests below
    (``test_greedy_with_a_shared_prefix_is_argmax_decoding_by_hand`` and
    ``test_shared_prefill_sampling_logprobs_are_what_completion_logprobs_scores``) pin that."""
    model, tokenizer = small_world()
    tau, n = 1.3, 4000
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["1+2=", "45+67="])  # left-padded
    torch.manual_seed(0)
    ids, mask, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=n,
                                      temperature=tau, max_new_tokens=3, shared_prefill=True)
    with torch.no_grad():
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                       position_ids=position_ids_from_mask(prompt_mask)).logits[:, -1]  # (2, V)
    for p in range(2):
        frequencies = torch.bincount(ids[p * n : (p + 1) * n, 0], minlength=len(tokenizer)) / n
        assert (frequencies - torch.softmax(logits[p] / tau, -1)).abs().max() < 0.03
    # later positions too: the cache copies carry each prompt's context
    plain, _, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=n,
                                     temperature=tau, max_new_tokens=3)
    for p in range(2):
        a = torch.bincount(ids[p * n : (p + 1) * n, 1], minlength=len(tokenizer)) / n
        b = torch.bincount(plain[p * n : (p + 1) * n, 1], minlength=len(tokenizer)) / n
        assert (a - b).abs().max() < 0.05


def lora_world(dtype=torch.float32):
    """The small world in a LoRA adapter whose B is not 0 (ΔW ≠ 0), in ``dtype``."""
    model, tokenizer = small_world()
    model = prepare_for_training(model.to(dtype), lora_rank=2)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return model, tokenizer


def test_a_shared_prefix_gives_the_same_logprobs_entropies_and_gradients():
    """Each prompt run once and its cache copied to the G rows of its group is the same function
    as running every row whole: in float64 the values agree to 1e-10 and the LoRA gradients to
    1e-6 of their largest entry (transformers' RMSNorm computes in float32 whatever the dtype)."""
    model, tokenizer = lora_world(torch.float64)
    G = 3
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["1+2=", "45+67=", "3="])  # left-padded
    torch.manual_seed(0)
    ids, mask, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=G,
                                      temperature=1.0, max_new_tokens=5, shared_prefill=True)
    assert (mask == 0).any()  # some completions end early: the masks differ within groups
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    model.train()
    adapter = [p for p in model.parameters() if p.requires_grad]
    results = []
    for group_size in (1, G):
        logprobs, entropy = completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, 1.3, group_size)
        grads = torch.autograd.grad(((logprobs + 0.1 * entropy) * mask).sum(), adapter)
        results.append((logprobs.detach(), entropy.detach(), grads))
    (lp1, ent1, g1), (lpG, entG, gG) = results
    on = mask.bool()
    torch.testing.assert_close(lpG[on], lp1[on], rtol=0, atol=1e-10)
    torch.testing.assert_close(entG[on], ent1[on], rtol=0, atol=1e-10)
    for a, b in zip(gG, g1):  # summed in another order, through RMSNorm's float32 upcast: not bitwise
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * b.abs().max().item())
    # the no-grad scoring passes, in whole groups (4 rows per pass round down to 3)
    torch.testing.assert_close(score(model, prompt_ids, prompt_mask, ids, mask, 1.3, 4, G)[on], lp1[on],
                               rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="divide the 9 rows"):
        completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, 1.0, 2)  # 2 does not divide 9 rows


# Left-padded to different lengths, all ending in "=": the last prompt token, the one that runs
# after the shared prefix, is the same for every prompt, so whatever tells their continuations
# apart has to come through each prompt's prefix cache.
SHARED_PROMPTS = ["1+2=", "45+67=", "9+90=", "3="]


def prompt_dependent_world():
    """The small world in a rank-4 LoRA adapter whose A and B are drawn under a seed (std 0.5):
    unlike the near-uniform bare model (whose arg-max continues every prompt with "="), its
    arg-max continuations differ from prompt to prompt."""
    model, tokenizer = small_world()
    model = prepare_for_training(model, lora_rank=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model, tokenizer


def test_greedy_with_a_shared_prefix_is_argmax_decoding_by_hand():
    """``sample_completions(greedy=True, shared_prefill=True)`` with G = 3 goes through the shared
    prefix (G > 1: each prompt but its last token run once, ``prefix_cache`` copied to its 3 rows,
    the copies continued by ``generate`` with ``do_sample=False``; the adapter merged).  Every row
    equals arg-max decoding of its prompt alone, a full forward pass of the unmerged adapter per
    token, no cache.  The prompts' first tokens differ though their last prompt token is the same
    "=", so a cache from another prompt (or from the wrong positions) cannot pass; each step's
    top-2 logit gap is > 1e-4, so no near-tie decides the comparison."""
    model, tokenizer = prompt_dependent_world()
    eos, pad, G = tokenizer.eos_token_id, tokenizer.pad_token_id, 3
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, SHARED_PROMPTS)
    assert len(set(prompt_mask.sum(-1).tolist())) == len(SHARED_PROMPTS)  # all lengths differ: padded
    ids, mask, truncated = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=G,
                                              temperature=1.0, max_new_tokens=6, greedy=True, shared_prefill=True)
    T = ids.shape[1]
    by_hand = []
    for prompt in SHARED_PROMPTS:
        alone = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = argmax_by_hand(model, alone, T, eos=eos)
        full = out + [eos] if len(out) < T else out  # the tokens generate must produce, then padding
        with torch.no_grad():
            logits = model(input_ids=torch.cat([alone, torch.tensor([out])], 1)).logits[0, alone.shape[1] - 1 :]
        assert (logits[: len(full)].topk(2).values.diff(dim=-1).abs() > 1e-4).all()  # no near-ties
        by_hand.append(full + [pad] * (T - len(full)))
    assert len({row[0] for row in by_hand}) > 1  # the prompts continue differently from the same "="
    for row in range(len(SHARED_PROMPTS) * G):
        assert ids[row].tolist() == by_hand[row // G], f"row {row} ({SHARED_PROMPTS[row // G]!r})"
    assert truncated.tolist() == [eos not in by_hand[row // G] for row in range(len(ids))]


def test_shared_prefill_sampling_logprobs_are_what_completion_logprobs_scores(monkeypatch):
    """While ``sample_completions(shared_prefill=True)`` samples (G = 4, τ = 0.7), its ``generate``
    call is spied on to return the logits of every step too (``output_logits``); log softmax
    (logits / τ) at the sampled tokens — the law each token was drawn from, with the adapter
    merged and the shared prefix cache — equals ``completion_logprobs`` with the shared prefix
    (``group_size`` G) and with every row run whole (1, no cache at all) at every masked position.
    Against the uncached pass, a prefix cache from the wrong prompt or positions cannot pass."""
    model, tokenizer = prompt_dependent_world()
    G, tau = 4, 0.7
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, SHARED_PROMPTS)
    generate, seen = model.generate, {}

    def spy(**kwargs):
        out = generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        seen.update(kwargs=kwargs, logits=out.logits)
        return out.sequences

    monkeypatch.setattr(model, "generate", spy)
    torch.manual_seed(0)
    ids, mask, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=G,
                                      temperature=tau, max_new_tokens=6, shared_prefill=True)
    monkeypatch.undo()
    N = len(SHARED_PROMPTS) * G
    assert "cache" in seen["kwargs"] and seen["kwargs"]["input_ids"].shape[0] == N  # the shared path ran
    sampled = torch.stack(seen["logits"], 1) / tau  # (N, T, V)
    assert sampled.shape[:2] == ids.shape
    sampled = token_logprobs(sampled, ids)  # (N, T)
    on = mask.bool()
    assert len({tuple(r) for r in ids.tolist()}) > len(SHARED_PROMPTS)  # draws differ within groups
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    with torch.no_grad():
        for rows_per_prompt in (G, 1):
            logprobs, _ = completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, tau, rows_per_prompt)
            torch.testing.assert_close(sampled[on], logprobs[on], rtol=0, atol=1e-5)


def test_a_shared_prefix_needs_the_kv_cache():
    model, tokenizer = small_world()
    model = prepare_for_training(model, gradient_checkpointing=True).train()
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["1+2=", "1+2="])
    ids = torch.ones(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        completion_logprobs(model, prompt_ids, prompt_mask, ids, torch.ones_like(ids), 1.0, 2)


def adapter_weights(model):
    return [m.get_base_layer().weight for m in model.modules() if hasattr(m, "get_delta_weight")]


def test_merged_lora_is_the_same_function_and_puts_w_back_bit_for_bit():
    """Inside ``merged_lora`` the policy's logits are the adapter's (ΔW ≠ 0) up to rounding and
    its base weights hold W + ΔW; afterwards (also after an exception) every W is the original
    tensor, unchanged, and the adapter is on again."""
    model, tokenizer = lora_world()
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["1+2=", "45+67="])
    originals = adapter_weights(model)
    copies = [w.clone() for w in originals]
    with torch.no_grad():
        expected = model(input_ids=prompt_ids, attention_mask=prompt_mask).logits
        with merged_lora(model):
            merged = model(input_ids=prompt_ids, attention_mask=prompt_mask).logits
            assert all(w is not o for w, o in zip(adapter_weights(model), originals))
        with pytest.raises(RuntimeError), merged_lora(model):
            raise RuntimeError
        again = model(input_ids=prompt_ids, attention_mask=prompt_mask).logits
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    assert all(w is o and torch.equal(w, c) for w, o, c in zip(adapter_weights(model), originals, copies))
    assert torch.equal(again, expected)  # the adapter is on again


def test_greedy_decoding_of_a_lora_policy_is_the_adapters():
    """Sampling with the adapter merged decodes what the unmerged adapter's arg-max gives."""
    model, tokenizer = lora_world()
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["1+2="])
    ids, _, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=1, temperature=1.0,
                                   max_new_tokens=4, greedy=True)
    assert ids[0].tolist() == argmax_by_hand(model, prompt_ids, ids.shape[1])


def test_bfloat16_weights_are_not_merged():
    """In bfloat16, W + ΔW would round a small ΔW away: those weights stay as they are."""
    model, _ = lora_world(torch.bfloat16)
    originals = adapter_weights(model)
    with merged_lora(model):
        assert all(w is o for w, o in zip(adapter_weights(model), originals))


def test_prompts_are_left_padded_whatever_the_tokenizer_says():
    """A tokenizer saved right-padded (many checkpoints are) must not move the prompts' last
    tokens away from the last column, where generation continues."""
    _, tokenizer = small_world()
    tokenizer.padding_side = "right"
    try:
        ids, mask = tokenize_prompts(tokenizer, ["1+2=", "45+67="])
    finally:
        tokenizer.padding_side = "left"
    assert mask[:, -1].tolist() == [1, 1] and mask[0, 0] == 0
    assert ids[0, -4:].tolist() == tokenizer("1+2=")["input_ids"][-4:]


# ---------------------------------------------------------------- top-k / top-p, scored consistently


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.8)])
def test_samples_follow_the_truncated_law_whatever_the_generation_config(top_k, top_p):
    """With top-k / top-p asked for, first-token frequencies over 4,000 samples match
    softmax(truncate_logits(logits / τ)) (4σ ≤ 0.03) and no dropped token is ever drawn, though
    the checkpoint asks for top-k 2, top-p 0.5, a repetition penalty and suppressed tokens."""
    model, tokenizer = small_world()
    hostile(model)
    tau, n = 0.7, 4000
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["1+2="])
    torch.manual_seed(0)
    ids, _, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=n, temperature=tau,
                                   max_new_tokens=1, top_k=top_k, top_p=top_p)
    frequencies = torch.bincount(ids[:, 0], minlength=len(tokenizer)) / n
    with torch.no_grad():
        expected = torch.softmax(truncate_logits(model(input_ids=prompt_ids).logits[0, -1] / tau, top_k, top_p), -1)
    assert (frequencies - expected).abs().max() < 0.03
    assert (frequencies[expected == 0] == 0).all() and (expected == 0).sum() >= 3  # some tokens were dropped
    assert (frequencies > 0).sum() > 2  # the checkpoint's top-k 2 was not applied


def direct_logits(model, batch, i, temperature):
    """Row i's unpadded [prompt, completion] run alone: its completion tokens (n,) and the logits
    / τ that predict them (n, V)."""
    prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
    completion = batch.completion_ids[i][batch.completion_mask[i].bool()]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1]
    return completion, logits / temperature


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.8), (4, 0.9)])
def test_sampled_tokens_are_kept_and_scored_under_the_truncation(top_k, top_p):
    """Every sampled token is inside the truncated set of the logits that drew it, so its
    log-prob is finite; old and reference log-probs are log softmax(truncate(logits / τ)), the
    law sampled from, at every token."""
    model, tokenizer = small_world()
    ref, _ = small_world(seed=1)
    tau = 0.7
    torch.manual_seed(2)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=4, max_new_tokens=5, ref_model=ref, temperature=tau,
                    top_k=top_k, top_p=top_p)
    on = batch.completion_mask.bool()
    assert torch.isfinite(batch.old_logprobs).all() and torch.isfinite(batch.ref_logprobs).all()
    for i in range(batch.completion_ids.shape[0]):
        completion, logits = direct_logits(model, batch, i, tau)
        truncated = truncate_logits(logits, top_k, top_p)  # (n, V)
        assert torch.isfinite(truncated.gather(-1, completion[:, None])).all()  # drawn from the kept set
        expected = torch.log_softmax(truncated, -1).gather(-1, completion[:, None]).squeeze(-1)
        torch.testing.assert_close(batch.old_logprobs[i][on[i]], expected, rtol=0, atol=1e-5)
        _, ref_logits = direct_logits(ref, batch, i, tau)
        expected_ref = token_logprobs(ref_logits, completion, top_k=top_k, top_p=top_p)
        torch.testing.assert_close(batch.ref_logprobs[i][on[i]], expected_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.8)])
def test_the_ratio_is_one_at_the_first_update_only_when_scored_with_the_truncation(top_k, top_p):
    """τ = 0.7 with top-p 0.8 (or top-k 3): at the first update π_θ = π_old, and
    ρ = exp(log π_θ − log π_old) is exactly 1 when the update scores the tokens under the same
    truncation.  Scored without it (softmax(logits / τ), the trap), every sampled token's
    probability is divided by the kept mass no longer: ρ < 1 at every token, by a margin."""
    model, tokenizer = small_world()
    tau = 0.7
    torch.manual_seed(3)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=4, max_new_tokens=5, temperature=tau,
                    top_k=top_k, top_p=top_p)
    on = batch.completion_mask.bool()
    args = (model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, tau)
    logprobs, _ = completion_logprobs(*args, top_k=top_k, top_p=top_p)  # the update's forward pass
    ratio = torch.exp(logprobs.detach() - batch.old_logprobs)[on]
    assert (ratio == 1).all()
    untruncated, _ = completion_logprobs(*args)
    trap = torch.exp(untruncated - batch.old_logprobs)[on]
    assert (trap < 0.99).all()


def test_a_token_outside_the_current_nucleus_gives_a_finite_loss_and_gradient():
    """Tokens drawn under top-k 3 from one model and scored, with the same truncation, by another
    (θ has moved): some fall outside its top 3; their log-probs are finite, and the whole
    objective (clipped ratio, k3 KL to the sampling model, entropy) and its gradient are too."""
    model, tokenizer = small_world()
    moved, _ = small_world(seed=1)
    tau, top_k = 0.7, 3
    torch.manual_seed(4)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=4, max_new_tokens=5, temperature=tau, top_k=top_k)
    outside = 0
    for i in range(batch.completion_ids.shape[0]):
        completion, logits = direct_logits(moved, batch, i, tau)
        outside += torch.isinf(truncate_logits(logits, top_k).gather(-1, completion[:, None])).sum().item()
    assert outside > 0
    moved.train()
    logprobs, entropy = completion_logprobs(moved, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                            batch.completion_mask, tau, top_k=top_k)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * len(EXAMPLES))
    out = grpo_loss(logprobs, batch.old_logprobs, advantages, batch.completion_mask.bool(),
                    ref_logprobs=batch.old_logprobs, entropy=entropy, beta=0.04, alpha=0.01)
    assert torch.isfinite(logprobs).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in moved.parameters())


# ---------------------------------------------------------------- a sampler that is a different program


def test_a_float32_sampler_draws_and_scores_what_the_policy_would():
    """A separate float32 copy as the sampler uses the RNG as the policy would: the same tokens
    under the same seed, the same old log-probs, and rollout log-probs equal to them up to 1e-6
    (the same weights, dtype and operations, but held in other memory: under the tests' pinned
    CPU numerics, MKL's matrix products round by alignment, a few ulps; 2.4e-7 measured at
    |log π| ≈ 2.5).  Without a sampler they are None."""
    model, tokenizer = small_world()
    sampler = Sampler(model)
    kwargs = {"group_size": 3, "max_new_tokens": 5, "temperature": 0.7, "top_p": 0.8}
    torch.manual_seed(5)
    plain = rollout(model, tokenizer, EXAMPLES, **kwargs)
    torch.manual_seed(5)
    separate = rollout(model, tokenizer, EXAMPLES, sampler=sampler.model, **kwargs)
    assert plain.rollout_logprobs is None
    assert torch.equal(plain.completion_ids, separate.completion_ids)
    assert torch.equal(plain.old_logprobs, separate.old_logprobs)
    torch.testing.assert_close(separate.rollout_logprobs, separate.old_logprobs, rtol=0, atol=1e-6)
    assert separate.rollout_logprobs.dtype == torch.float32


def test_a_bfloat16_sampler_scores_its_own_law():
    """The sampler in bfloat16 scores the tokens in bfloat16, upcast to float32: they differ from
    the float32 policy's old log-probs by a little (bfloat16 keeps 8 bits of mantissa) but not
    nothing, and they are the bfloat16 model's log-probs (a direct pass of it)."""
    model, tokenizer = small_world()
    sampler = Sampler(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in sampler.model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the policy is untouched
    tau = 0.7
    torch.manual_seed(6)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=4, max_new_tokens=5, temperature=tau,
                    sampler=sampler.model, top_p=0.9)
    on = batch.completion_mask.bool()
    assert batch.rollout_logprobs.dtype == torch.float32 and torch.isfinite(batch.rollout_logprobs).all()
    gap = (batch.rollout_logprobs - batch.old_logprobs)[on].abs()
    assert 0 < gap.max() < 0.1
    i = 0
    completion, logits = direct_logits(sampler.model, batch, i, tau)
    torch.testing.assert_close(batch.rollout_logprobs[i][on[i]], token_logprobs(logits, completion, top_p=0.9),
                               rtol=0, atol=2e-2)


def test_select_groups_and_concat_rollouts_carry_rollout_logprobs():
    model, tokenizer = small_world()
    torch.manual_seed(7)
    batch = rollout(model, tokenizer, EXAMPLES, group_size=2, max_new_tokens=4, sampler=Sampler(model).model)
    picked = select_groups(batch, [2, 0], 2)
    torch.testing.assert_close(picked.rollout_logprobs, batch.rollout_logprobs[[4, 5, 0, 1]])
    short = rollout(model, tokenizer, EXAMPLES[:1], group_size=2, max_new_tokens=1, sampler=Sampler(model).model)
    both = concat_rollouts([short, picked], tokenizer.pad_token_id)
    T = picked.completion_ids.shape[1]
    assert both.rollout_logprobs.shape == (6, T)
    assert (both.rollout_logprobs[:2, 1:] == 0).all()  # padding: log-prob 0, mask 0
    torch.testing.assert_close(both.rollout_logprobs[2:], picked.rollout_logprobs)
    plain = rollout(model, tokenizer, EXAMPLES[:1], group_size=2, max_new_tokens=1)
    assert concat_rollouts([plain, short], tokenizer.pad_token_id).rollout_logprobs is None
