"""Held-out evaluation: the Wilson interval, the exact McNemar test, and ``evaluate`` itself."""

import math

import pytest
import torch

from hypothesis import given
from hypothesis import strategies as st

from minigrpo.evaluation import (EvalResult, detectable_difference, evaluate, mcnemar_p_value, pass_at_k,
                                 sampled_pass_at_k, wilson_interval)
from minigrpo.rewards import exact_match_reward
from minigrpo.rollout import greedy_completions
from minigrpo.tiny import TinyModelConfig, build_model, build_tokenizer


@pytest.mark.parametrize(
    "correct, n, expected",
    [(50, 100, (0.4038, 0.5962)), (0, 2, (0.0, 0.6576)), (10, 10, (0.7225, 1.0)), (659, 1319, (0.4727, 0.5266))],
)
def test_wilson_interval_known_values(correct, n, expected):
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)
    assert 0.0 <= lo <= correct / n <= hi <= 1.0


@pytest.mark.parametrize("correct, n", [(3, 2), (-1, 5), (0, 0)])
def test_wilson_interval_rejects_bad_counts(correct, n):
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(correct, n)


def test_mcnemar_exact_values():
    # 10 discordant pairs, 9 improved, 1 worse: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    before = [False] * 9 + [True] + [True] * 5
    after = [True] * 9 + [False] + [True] * 5
    assert mcnemar_p_value(before, after) == pytest.approx(22 / 1024)
    assert mcnemar_p_value(after, before) == pytest.approx(22 / 1024)  # two-sided
    assert mcnemar_p_value([True, False], [True, False]) == 1.0  # nothing changed
    assert mcnemar_p_value([False] * 8, [True] * 8) == pytest.approx(2 / 256)
    with pytest.raises(ValueError, match="pair"):
        mcnemar_p_value([True], [True, False])


def test_detectable_difference():
    # 8 problems all going one way give p = 2/256 < 0.01; 7 give 2/128 > 0.01
    assert mcnemar_p_value([False] * 8, [True] * 8) < 0.01 < mcnemar_p_value([False] * 7, [True] * 7)
    assert detectable_difference(400, discordant=8) == pytest.approx(8 / 400)
    assert detectable_difference(400, discordant=7) == math.inf
    # 100 discordant: 63 vs 37 gives p = 0.012, 64 vs 36 gives 0.0066
    assert detectable_difference(1000, discordant=100) == pytest.approx(28 / 1000)
    with pytest.raises(ValueError, match="discordant"):
        detectable_difference(10, discordant=11)


def test_evaluate_counts_scores_and_truncation(one_thread):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    examples = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(7)]
    texts = greedy_completions(model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens=3)
    examples[2]["answer"] = texts[2]  # one problem the untrained model "solves"
    result = evaluate(model, tokenizer, examples, exact_match_reward, max_new_tokens=3, batch_size=3, step=5)
    assert isinstance(result, EvalResult) and result.step == 5 and result.n == 7
    assert result.completions == texts  # batches of 3 decode as one batch of 7 does
    assert result.correct_mask[2] and result.correct == sum(result.correct_mask)
    assert result.accuracy == result.correct / 7 and result.interval == wilson_interval(result.correct, 7)
    assert 0.0 <= result.truncated_frac <= 1.0
    assert set(result.summary()) == {"step", "n", "correct", "accuracy", "wilson95", "truncated_frac"}
    assert torch.is_grad_enabled()


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_binomial_formula(nck):
    """1 − C(n−c, k)/C(n, k): the chance that k of the n samples, drawn without replacement,
    include a correct one; pass@1 = c/n."""
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# Five problems "a+1=" (answer a+1), five samples each, written down by hand.  A sample counts
# when the reward is exactly 1: "11" for answer "1" earns 0.5 (it contains the answer) and does
# not count.  Correct per problem: c = 0, 1, 2, 5, 4.
HAND_SAMPLES = {
    "0+1=": ["2", "11", "7", "0", "3"],  # answer 1: c = 0
    "1+1=": ["2", "3", "22", "5", "12"],  # answer 2: c = 1
    "2+1=": ["3", "1", "3", "9", "33"],  # answer 3: c = 2
    "3+1=": ["4", "4", "4", "4", "4"],  # answer 4: c = 5
    "4+1=": ["5", "5", "6", "5", "5"],  # answer 5: c = 4
}
# pass@k = 1 − C(n−c, k)/C(n, k) with n = 5, worked on paper, then averaged over the 5 problems:
#   k = 1: c/5                     → 0, .2, .4, 1, .8  → 2.4/5 = 0.48
#   k = 2: 1 − C(5−c, 2)/10        → 0, 1 − 6/10, 1 − 3/10, 1, 1 (C(1, 2) = 0)  → 3.1/5 = 0.62
#   k = 3: 1 − C(5−c, 3)/10        → 0, 1 − 4/10, 1 − 1/10, 1, 1  → 3.5/5 = 0.70
#   k = 5: 1 − C(5−c, 5)/1         → 0, 1, 1, 1, 1  → 4/5 = 0.80
# (pooling the 12 correct of 25 instead would give pass@2 = 1 − C(13, 2)/C(25, 2) = 0.74.)
HAND_PASS_AT_K = {1: 0.48, 2: 0.62, 3: 0.70, 5: 0.80}


def test_sampled_pass_at_k_counts_correct_samples(one_thread, monkeypatch):
    """Counts and pass@k made by hand: the sampler is replaced by one that returns the samples
    written down in ``HAND_SAMPLES`` for whichever prompts it is given (each followed by EOS and,
    past the mask, junk that would spoil the count if it were decoded), two prompts per batch;
    the reward gives 0.5 to near misses, which must not count.  The package must find c = 0, 1,
    2, 5, 4 and the per-problem average of 1 − C(n−c, k)/C(n, k) computed on paper."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    examples = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(5)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    calls = []

    def hand_sampler(model_, tokenizer_, prompt_ids, prompt_mask, *, group_size, temperature, max_new_tokens,
                     **kwargs):
        prompts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(prompt_ids, prompt_mask)]
        calls.append((prompts, group_size, temperature, max_new_tokens))
        rows, masks = [], []
        for prompt in prompts:
            for text in HAND_SAMPLES[prompt]:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
                junk = tokenizer("1234", add_special_tokens=False)["input_ids"]  # after the EOS, masked out
                rows.append(ids + junk)
                masks.append([1] * len(ids) + [0] * len(junk))
        T = max(map(len, rows)) + 1
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        mask = torch.tensor([m + [0] * (T - len(m)) for m in masks])
        return ids, mask, torch.zeros(len(rows), dtype=torch.bool)

    monkeypatch.setattr("minigrpo.evaluation.sample_completions", hand_sampler)

    def reward(completion, answer):  # 1 for the answer, 0.5 for a near miss that contains it
        return 1.0 if completion == answer else 0.5 if answer in completion else 0.0

    out = sampled_pass_at_k(model, tokenizer, examples, reward, n=5, ks=(1, 2, 3, 5), temperature=1.5,
                            max_new_tokens=3, prompts_per_batch=2)
    assert [c[0] for c in calls] == [["0+1=", "1+1="], ["2+1=", "3+1="], ["4+1="]]  # two prompts per batch
    assert all(c[1:] == (5, 1.5, 3) for c in calls)  # n samples per prompt at τ, up to the token limit
    assert out["correct"] == [0, 1, 2, 5, 4] and out["n"] == 5
    assert out["pass_at_k"] == pytest.approx(HAND_PASS_AT_K, abs=1e-12)
    with pytest.raises(ValueError, match="k"):
        sampled_pass_at_k(model, tokenizer, examples, reward, n=2, ks=(3,), max_new_tokens=3)
