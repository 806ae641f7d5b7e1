"""Held-out evaluation: greedy accuracy with its uncertainty, and a paired before/after test.

One function, ``evaluate``, scores greedy (arg-max) completions of held-out prompts with a
reward function; the trainer, both experiments, the book and the benchmarks all call it.

    result = evaluate(model, tokenizer, examples, correctness_reward, max_new_tokens=512)
    result.accuracy, result.interval, result.truncated_frac
    mcnemar_p_value(before.correct_mask, after.correct_mask)   # same problems, before vs after

Sampled evaluation, pass@k: ``sampled_pass_at_k`` draws n completions per problem from
softmax(logits / τ), counts the correct ones, and averages the unbiased estimator
``pass_at_k(n, c, k)`` over problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from minigrpo.rollout import decode_completions, greedy_decode, sample_completions, tokenize_prompts, model_device


@dataclass
class EvalResult:
    """Greedy held-out accuracy of one model on ``n`` problems."""

    step: int
    """the GRPO step at which it was measured (0: before training)"""
    n: int
    """problems evaluated"""
    correct: int
    """problems whose greedy completion scored 1"""
    truncated_frac: float
    """fraction of completions cut at the token limit, with no end-of-sequence token"""
    completions: list[str] = field(default_factory=list, repr=False)
    """the greedy completions, in the order of the examples"""
    correct_mask: list[bool] = field(default_factory=list, repr=False)
    """per problem: did its completion score 1 (what a paired test compares)"""

    @property
    def accuracy(self) -> float:
        """correct / n"""
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """the 95% Wilson interval of the accuracy"""
        return wilson_interval(self.correct, self.n)

    def describe(self) -> str:
        """One line: accuracy, correct / n, the Wilson interval and the truncated share."""
        lo, hi = self.interval
        return (f"accuracy {self.accuracy:.3f} ({self.correct}/{self.n}), 95% Wilson interval "
                f"[{lo:.3f}, {hi:.3f}], {self.truncated_frac:.3f} cut at the token limit")

    def summary(self) -> dict:
        """The numbers without the completions, JSON-ready."""
        return {"step": self.step, "n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "wilson95": list(self.interval), "truncated_frac": self.truncated_frac}


def evaluate(model, tokenizer, examples, reward, *, max_new_tokens: int, batch_size: int = 64,
             step: int = 0, progress: bool = False) -> EvalResult:
    """Greedy completions of every example's prompt, each scored by ``reward(completion, answer)``;
    a problem is correct when its reward is 1.  ``batch_size`` prompts per ``generate`` call."""
    completions, truncated = [], []
    for i in tqdm(range(0, len(examples), batch_size), desc="eval", leave=False, disable=not progress):
        texts, cut = greedy_decode(model, tokenizer, [ex["prompt"] for ex in examples[i : i + batch_size]],
                                   max_new_tokens)
        completions += texts
        truncated += cut
    correct_mask = [reward(c, ex["answer"]) == 1.0 for c, ex in zip(completions, examples)]
    n = len(examples)
    return EvalResult(step=step, n=n, correct=sum(correct_mask), truncated_frac=sum(truncated) / max(n, 1),
                      completions=completions, correct_mask=correct_mask)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion p̂ = correct / n (95% for z = 1.96):

        (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)

    Unlike p̂ ± z·√(p̂(1−p̂)/n) it stays inside [0, 1] and is not empty at p̂ = 0 or 1.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 ≤ correct ≤ n and n ≥ 1, got correct={correct}, n={n}")
    p = correct / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def mcnemar_p_value(before: list[bool], after: list[bool]) -> float:
    """Two-sided exact McNemar test of "before and after are equally accurate" on paired results.

    Only the discordant problems count: b solved before but not after, c after but not before.
    Under the null each discordant problem goes either way with probability ½, so
    p = min(1, 2·P[Binomial(b + c, ½) ≤ min(b, c)]).  1.0 when nothing changed.
    """
    if len(before) != len(after):
        raise ValueError(f"before and after must pair up, got {len(before)} and {len(after)} results")
    b = sum(x and not y for x, y in zip(before, after))
    c = sum(y and not x for x, y in zip(before, after))
    return _mcnemar(b, c)


def _mcnemar(b: int, c: int) -> float:
    tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)
    return min(1.0, 2 * tail)


def detectable_difference(n: int, discordant: int, alpha: float = 0.01) -> float:
    """The smallest accuracy gain (c − b) / n that the exact McNemar test calls significant at
    level ``alpha`` when ``discordant`` = b + c of the ``n`` paired problems changed verdict
    (inf when no split of them would be significant)."""
    if not 0 <= discordant <= n:
        raise ValueError(f"need 0 ≤ discordant ≤ n, got discordant={discordant}, n={n}")
    for c in range((discordant + 1) // 2, discordant + 1):
        if _mcnemar(discordant - c, c) < alpha:
            return (2 * c - discordant) / n
    return math.inf


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k, the chance that at least one of k samples is correct,
    from n ≥ k samples of which c are correct (Chen et al., 2021):

        pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n−c+1}^{n} (1 − k / i)

    (the product form never builds the large binomials).  pass@1 is c / n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def sampled_pass_at_k(model, tokenizer, examples, reward, *, n: int, ks, temperature: float = 1.0,
                      max_new_tokens: int, prompts_per_batch: int = 16) -> dict:
    """pass@k for each k in ``ks``: n samples per problem from softmax(logits / τ), scored by
    ``reward(completion, answer) == 1``, the unbiased estimator averaged over problems.

    Returns ``{"pass_at_k": {k: mean}, "correct": [c per problem], "n": n}``.  Sampling uses
    torch's global RNG: seed it (or fork it) for a reproducible estimate.
    """
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"every k must be in [1, n={n}], got {list(ks)}")
    correct = []
    for i in range(0, len(examples), prompts_per_batch):
        batch = examples[i : i + prompts_per_batch]
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [ex["prompt"] for ex in batch], model_device(model))
        ids, mask, _ = sample_completions(model, tokenizer, prompt_ids, prompt_mask, group_size=n,
                                          temperature=temperature, max_new_tokens=max_new_tokens)  # (B·n, T)
        texts = decode_completions(tokenizer, ids, mask)
        for j, ex in enumerate(batch):
            correct.append(sum(reward(t, ex["answer"]) == 1.0 for t in texts[j * n : (j + 1) * n]))
    means = {k: sum(pass_at_k(n, c, k) for c in correct) / max(len(correct), 1) for k in ks}
    return {"pass_at_k": means, "correct": correct, "n": n}
