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


def word_problems(held_out: bool = False, size: int | None = None, seed: int = 1234,
                  max_number: int = 20) -> list[dict[str, str]]:
    """One-step addition and subtraction word problems ``{"question", "answer"}``, numbers
    1 … ``max_number`` (a subtraction never goes below 0): the easiest rung of GSM8K's ladder.

    A problem is held out when a fixed hash of its operation and numbers says so (about one in
    ten), so no held-out (operation, a, b) appears in training under any name or wording.
    ``size`` picks that many in an order fixed by ``seed`` (None: all of them).
    """
    problems = []
    for (template_id, (op, template)), a, b, variant in itertools.product(
        enumerate(WORD_TEMPLATES), range(1, max_number + 1), range(1, max_number + 1), range(3)
    ):
        if op == "-" and b > a or (zlib.crc32(f"{op}{a},{b}".encode()) % 10 == 0) != held_out:
            continue
        name = WORD_NAMES[(a + 3 * b + template_id + 3 * variant) % len(WORD_NAMES)]
        things = WORD_THINGS[(3 * a + b + 5 * template_id + variant) % len(WORD_THINGS)]
        question = template.format(name=name, things=things, a=a, b=b)
        problems.append({"question": question, "answer": str(a + b if op == "+" else a - b)})
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
    """Examples ``{"prompt", "answer"}``: chat prompts and gold answers from a GSM8K dataset."""
    return [
        {"prompt": gsm8k_prompt(tokenizer, row["question"]), "answer": gsm8k_gold(row["answer"])}
        for row in dataset
    ]
