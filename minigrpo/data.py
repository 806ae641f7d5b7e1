"""The tasks: arithmetic for the tiny world, GSM8K for a real instruct model.

Every task yields examples as dicts ``{"prompt": str, "answer": str}``; the trainer samples
prompts from them and scores completions against ``answer``.

Arithmetic: ``"23+45="`` → ``"68"``, operands drawn from ``0 … 10**digits − 1``.  An unordered
pair {a, b} is held out when a fixed hash of it says so (about one pair in ten), so the
held-out problems never appear among the training prompts, in either order, for any seed.

The warm-up (supervised) data stands in for pre-training.  A *sloppy teacher* writes the
labels: on a carry problem it forgets the carries with probability ``sloppiness`` and writes
the digit-wise sum mod 10 (58+67 → "15").  A model trained on it is right on easy problems
and mostly wrong on carry problems; the reward in GRPO then teaches what the demonstrations
rarely showed.

GSM8K: loaded the way users do, ``datasets.load_dataset("openai/gsm8k", "main")``, or from a
local JSONL file in the same format (``question``, ``answer`` ending in ``#### n``).
"""

from __future__ import annotations

import itertools
import json
import random
import zlib

import datasets

# ---------------------------------------------------------------- arithmetic


def is_held_out(a: int, b: int) -> bool:
    """True when the unordered pair {a, b} belongs to the held-out split (~10% of pairs).

    A CRC-32 of the sorted pair: deterministic, symmetric in (a, b), unrelated to carries.
    """
    lo, hi = min(a, b), max(a, b)
    return zlib.crc32(f"{lo}+{hi}".encode()) % 10 == 0


def has_carry(a: int, b: int) -> bool:
    """True when column addition of a + b carries at least once."""
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def sum_without_carries(a: int, b: int) -> int:
    """The sloppy teacher's answer: each column's digit sum mod 10, carries dropped (58+67 → 15)."""
    result, place = 0, 1
    while a or b:
        result += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def arithmetic_prompt(a: int, b: int) -> str:
    """The prompt the model sees, e.g. ``"23+45="``."""
    return f"{a}+{b}="


def arithmetic_pairs(digits: int = 2, held_out: bool = False) -> list[tuple[int, int]]:
    """All ordered pairs (a, b) with a, b < 10**digits in the chosen split, in a fixed order."""
    n = 10**digits
    return [(a, b) for a in range(n) for b in range(n) if is_held_out(a, b) == held_out]


def arithmetic_examples(
    digits: int = 2, held_out: bool = False, size: int | None = None, seed: int = 1234
) -> list[dict[str, str]]:
    """Examples ``{"prompt": "a+b=", "answer": str(a+b)}`` from one split.

    ``size`` picks that many pairs in a shuffled order fixed by ``seed`` (None: all of them);
    the default seed is not the training seed, so every run evaluates the same held-out set.
    """
    pairs = arithmetic_pairs(digits, held_out)
    if size is not None:
        if size > len(pairs):
            raise ValueError(f"size={size} exceeds the {len(pairs)} pairs of the split")
        pairs = random.Random(seed).sample(pairs, size)
    return [{"prompt": arithmetic_prompt(a, b), "answer": str(a + b)} for a, b in pairs]


def sloppy_label(a: int, b: int, rng: random.Random, sloppiness: float) -> str:
    """The teacher's label for a + b: on a carry problem, with probability ``sloppiness``,
    the sum without carries; otherwise the true sum."""
    if has_carry(a, b) and rng.random() < sloppiness:
        return str(sum_without_carries(a, b))
    return str(a + b)


def warmup_examples(
    num_examples: int, digits: int = 2, sloppiness: float = 0.0, seed: int = 0, padding: float = 0.0
) -> list[dict[str, str]]:
    """Supervised warm-up data ``{"prompt", "completion"}`` from the training split only.

    ``sloppiness`` = 0 gives a clean teacher; e.g. 0.6 forgets the carries on 60% of the
    carry problems.  ``padding`` is the probability that a label is written with 1 to 3 leading
    zeros (``"068"``): the padded-answer task, whose answers vary in length, not in value.
    """
    for name, p in (("sloppiness", sloppiness), ("padding", padding)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    rng = random.Random(seed)
    pairs = arithmetic_pairs(digits, held_out=False)
    examples = []
    for _ in range(num_examples):
        a, b = rng.choice(pairs)
        label = sloppy_label(a, b, rng, sloppiness)
        if padding and rng.random() < padding:  # no draw at padding = 0: unpadded data unchanged
            label = "0" * rng.randint(1, 3) + label
        examples.append({"prompt": arithmetic_prompt(a, b), "completion": label})
    return examples


# ---------------------------------------------------------------- word problems (GSM8K's family, one step)

WORD_NAMES = ("Ana", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana")
WORD_THINGS = ("apples", "marbles", "stickers", "coins", "books", "shells", "pens", "cards")
WORD_TEMPLATES = (
    ("+", "{name} has {a} {things}. {name} finds {b} more {things}. How many {things} does {name} have now?"),
    ("+", "{name} had {a} {things} and bought {b} more. How many {things} does {name} have?"),
    ("-", "{name} has {a} {things} and gives {b} of them away. How many {things} does {name} have left?"),
    ("-", "There were {a} {things} on the table. {name} took {b}. How many {things} are on the table now?"),
)


HELD_OUT_SHARE = 4
"""a fact is held out unless a fixed hash of it is divisible by this: about 3 in 4 facts (313 of
the 420 with numbers up to 20), so that the held-out set has over 300 distinct facts"""


def word_facts(max_number: int = 20) -> list[tuple[str, int, int]]:
    """Every fact (operation, a, b) with numbers 1 … ``max_number``: a sum is one fact in either
    order, ("+", a, b) with a ≤ b; a difference never goes below 0, ("-", a, b) with b ≤ a."""
    numbers = range(1, max_number + 1)
    return [("+", a, b) for a in numbers for b in numbers if a <= b] + [
        ("-", a, b) for a in numbers for b in numbers if b <= a
    ]


def _fact_hash(fact: tuple[str, int, int], salt: str = "") -> int:
    return zlib.crc32(f"{salt}{fact[0]}{fact[1]},{fact[2]}".encode())


def _is_held_out(fact: tuple[str, int, int]) -> bool:
    """The split: by a hash, but the prompt's own worked example (3 + 4) is always a training fact."""
    return fact != WORD_EXAMPLE_FACT and _fact_hash(fact) % HELD_OUT_SHARE != 0


def word_problems(held_out: bool = False, size: int | None = None, seed: int = 1234,
                  max_number: int = 20) -> list[dict[str, str]]:
    """One-step addition and subtraction word problems ``{"question", "answer", "fact"}``,
    numbers 1 … ``max_number``: the easiest rung of GSM8K's ladder.

    The unit is the fact (``word_facts``; "3 + 4" and "4 + 3" are one).  A fact is held out when a
    fixed hash of it says so (``HELD_OUT_SHARE``), so no held-out fact appears in training under
    any name, wording or order.  The training split has every wording of its facts (two
    templates, three name/object variants, both orders of a sum); the held-out split one wording
    per fact, picked by another hash, so its problems are as many as its facts and independent
    of each other as far as facts are.  ``size`` picks that many in an order fixed by ``seed``
    (None: all of them).
    """
    problems = []
    for fact in word_facts(max_number):
        if _is_held_out(fact) != held_out:
            continue
        op, a, b = fact
        templates = [(i, t) for i, (o, t) in enumerate(WORD_TEMPLATES) if o == op]
        orders = [(a, b), (b, a)] if op == "+" and a != b else [(a, b)]
        wordings = list(itertools.product(templates, range(3), orders))
        if held_out:
            wordings = [wordings[_fact_hash(fact, "wording") % len(wordings)]]
        for (template_id, template), variant, (x, y) in wordings:
            name = WORD_NAMES[(x + 3 * y + template_id + 3 * variant) % len(WORD_NAMES)]
            things = WORD_THINGS[(3 * x + y + 5 * template_id + variant) % len(WORD_THINGS)]
            problems.append({"question": template.format(name=name, things=things, a=x, b=y),
                             "answer": str(a + b if op == "+" else a - b), "fact": f"{op} {a} {b}"})
    if size is not None:
        if size > len(problems):
            raise ValueError(f"size={size} exceeds the {len(problems)} problems of the split")
        problems = random.Random(seed).sample(problems, size)
    return problems


WORD_SYSTEM = "Solve the math problem."
WORD_INSTRUCTION = "Put your final answer within \\boxed{}."
WORD_EXAMPLE = ("Tom has 3 pens. Tom finds 4 more pens. How many pens does Tom have now?",
                "3 + 4 = 7. The answer is \\boxed{7}.")
"""the one-shot example every word-problem prompt shows: question, then a worked answer"""
WORD_EXAMPLE_FACT = ("+", 3, 4)
"""the example's fact, which every prompt shows: never held out"""


def word_problem_prompt(tokenizer, question: str) -> str:
    """The chat prompt: a short system line, one worked example, then the question, each asking
    for the answer in \\boxed{}; rendered with the tokenizer's chat template, assistant turn open."""
    messages = [
        {"role": "system", "content": WORD_SYSTEM},
        {"role": "user", "content": f"{WORD_EXAMPLE[0]}\n{WORD_INSTRUCTION}"},
        {"role": "assistant", "content": WORD_EXAMPLE[1]},
        {"role": "user", "content": f"{question}\n{WORD_INSTRUCTION}"},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- GSM8K

GSM8K_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_gsm8k(split: str = "train", path: str | None = None) -> datasets.Dataset:
    """GSM8K as a ``datasets.Dataset`` with columns ``question`` and ``answer``.

    ``path=None`` loads ``openai/gsm8k`` (config ``main``) from the hub or its cache; a path
    reads a local JSONL file in the same format directly (then ``split`` is ignored): no cache
    to fill, so nothing prints a progress bar the first time and not the next.
    """
    if path is None:
        return datasets.load_dataset("openai/gsm8k", "main", split=split)
    with open(path, encoding="utf-8") as f:
        return datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])


def gsm8k_gold(answer: str) -> str:
    """The gold final answer: the text after ``####``, thousands separators removed.

    >>> gsm8k_gold("3 + 4 = <<3+4=7>>7 apples\\n#### 1,007")
    '1007'
    """
    if "####" not in answer:
        raise ValueError("answer has no '####' line; is it a GSM8K solution?")
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_prompt(tokenizer, question: str) -> str:
    """The chat prompt: the question plus the instruction to box the final answer,
    rendered with the tokenizer's chat template and the assistant turn opened."""
    messages = [{"role": "user", "content": f"{question.strip()}\n{GSM8K_INSTRUCTION}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def gsm8k_examples(dataset: datasets.Dataset, tokenizer) -> list[dict[str, str]]:
    """Examples ``{"prompt", "answer", "question"}``: chat prompts, gold answers and the plain
    questions from a GSM8K dataset."""
    return [
        {"prompt": gsm8k_prompt(tokenizer, row["question"]), "answer": gsm8k_gold(row["answer"]),
         "question": row["question"]}
        for row in dataset
    ]
