"""The arithmetic task, the sloppy teacher, the word problems and GSM8K loading (offline, on a
fixture)."""

import re

import pytest

from minigrpo.data import (
    arithmetic_examples,
    arithmetic_pairs,
    gsm8k_examples,
    gsm8k_gold,
    gsm8k_prompt,
    has_carry,
    is_held_out,
    load_gsm8k,
    sum_without_carries,
    warmup_examples,
    word_problem_prompt,
    word_problems,
)
from minigrpo.gsm8k import FIXTURE_DIR
from minigrpo.tiny import build_tokenizer

FIXTURE = FIXTURE_DIR / "train.jsonl"  # the package's own GSM8K-format fixture


def unordered(examples):
    return {frozenset(map(int, ex["prompt"].rstrip("=").split("+"))) for ex in examples}


def test_held_out_never_overlaps_training():
    train, held_out = arithmetic_pairs(2, held_out=False), arithmetic_pairs(2, held_out=True)
    assert len(train) + len(held_out) == 100 * 100
    assert 0.05 < len(held_out) / 10_000 < 0.15
    assert not {frozenset(p) for p in train} & {frozenset(p) for p in held_out}  # in either order
    assert all(is_held_out(b, a) == is_held_out(a, b) for a, b in held_out)


def test_warmup_data_comes_from_training_split_only():
    examples = warmup_examples(2000, digits=2, sloppiness=0.5, seed=0)
    held_out = unordered(arithmetic_examples(2, held_out=True))
    assert not unordered(examples) & held_out


def test_examples_are_deterministic_and_correct():
    a = arithmetic_examples(2, held_out=True, size=50)
    assert a == arithmetic_examples(2, held_out=True, size=50)
    for ex in a:
        x, y = map(int, ex["prompt"].rstrip("=").split("+"))
        assert ex["answer"] == str(x + y)


def test_carries_and_the_sloppy_sum():
    assert has_carry(58, 67) and has_carry(5, 5) and not has_carry(23, 45)
    assert sum_without_carries(58, 67) == 15
    assert sum_without_carries(23, 45) == 68
    assert sum_without_carries(95, 5) == 90


def test_sloppy_teacher_drops_carries_on_about_the_right_share():
    examples = warmup_examples(4000, digits=2, sloppiness=0.6, seed=1)
    carry_wrong = carry_total = 0
    for ex in examples:
        x, y = map(int, ex["prompt"].rstrip("=").split("+"))
        if has_carry(x, y):
            carry_total += 1
            if ex["completion"] != str(x + y):
                assert ex["completion"] == str(sum_without_carries(x, y))
                carry_wrong += 1
        else:
            assert ex["completion"] == str(x + y)  # no-carry problems are always right
    assert 0.55 < carry_wrong / carry_total < 0.65
    clean = warmup_examples(500, digits=2, sloppiness=0.0, seed=1)
    assert all(ex["completion"] == str(eval(ex["prompt"][:-1])) for ex in clean)


def test_sloppiness_is_checked():
    with pytest.raises(ValueError, match="sloppiness"):
        warmup_examples(10, sloppiness=1.5)
    with pytest.raises(ValueError, match="padding"):
        warmup_examples(10, padding=-0.1)


def test_padded_answers_keep_their_value():
    """padding = 0.5: about half the labels get 1 to 3 leading zeros; every label keeps its value."""
    padded = warmup_examples(2000, digits=2, padding=0.5, seed=3)
    zeros = [len(ex["completion"]) - len(ex["completion"].lstrip("0")) for ex in padded
             if ex["completion"].lstrip("0")]  # answers that are not 0 itself
    assert all(int(ex["completion"]) == eval(ex["prompt"][:-1]) for ex in padded)
    assert 0.45 < sum(z > 0 for z in zeros) / len(zeros) < 0.55 and max(zeros) == 3


def test_gsm8k_fixture_loads_like_the_hub_dataset():
    dataset = load_gsm8k(path=FIXTURE)
    assert len(dataset) == 8
    assert set(dataset.column_names) == {"question", "answer"}
    golds = [gsm8k_gold(a) for a in dataset["answer"]]
    assert golds[:2] == ["7", "30"]
    assert gsm8k_gold("so 1,000 + 80\n#### 1,080") == "1080"  # separators removed


def test_gsm8k_gold_needs_the_marker():
    assert gsm8k_gold("so 3 + 4 = 7\n#### 7") == "7"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final line")


def test_gsm8k_chat_prompt_asks_for_a_boxed_answer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    examples = gsm8k_examples(load_gsm8k(path=FIXTURE), tokenizer)
    prompt = examples[0]["prompt"]
    assert prompt.startswith("<|user|>Tom has 3 apples")
    assert "\\boxed{}" in prompt and prompt.endswith("<|assistant|>")
    assert examples[0]["answer"] == "7"
    assert gsm8k_prompt(tokenizer, "What is 2+2?").count("<|user|>") == 1


def test_word_problems_hold_out_distinct_facts_one_wording_each():
    """Over 300 held-out facts, each one problem; no held-out fact in training under any wording
    or order (3 + 4 and 4 + 3 are one fact); the prompt's worked example is a training fact."""
    train, held_out = word_problems(held_out=False), word_problems(held_out=True)
    facts = [p["fact"] for p in held_out]
    assert len(facts) == len(set(facts)) >= 300  # one wording per fact
    assert not set(facts) & {p["fact"] for p in train}
    numbers = lambda p: tuple(map(int, re.findall(r"\d+", p["question"])))  # noqa: E731
    for p in held_out + train:
        op, a, b = p["fact"].split()
        x, y = numbers(p)
        assert {x, y} == {int(a), int(b)} and int(p["answer"]) == (x + y if op == "+" else x - y) >= 0
        if op == "+":
            assert int(a) <= int(b)
    held_out_sums = {frozenset(numbers(p)) for p in held_out if p["fact"][0] == "+"}
    train_sums = {frozenset(numbers(p)) for p in train if p["fact"][0] == "+"}
    assert not held_out_sums & train_sums  # neither order of a held-out sum is trained on
    assert "+ 3 4" in {p["fact"] for p in train}
    assert word_problems(held_out=True, size=10) == word_problems(held_out=True, size=10)


def test_word_problem_prompt_shows_one_worked_example():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompt = word_problem_prompt(tokenizer, "Ana has 2 pens. Ana finds 3 more pens. How many?")
    assert prompt.count("<|user|>") == 2 and prompt.count("\\boxed{}") == 2
    assert "\\boxed{7}" in prompt and prompt.endswith("<|assistant|>")
