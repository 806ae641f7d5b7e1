"""Rewards: answer extraction, math-verify correctness, format and exact match.

Never raising and never hanging are correctness properties of a reward, so the adversarial
tests assert a (very generous) bound on each call; speed itself is measured elsewhere.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigrpo import rewards
from minigrpo.rewards import correctness_reward, exact_match_reward, extract_answer, format_reward, number_match_reward

HANG_BOUND_S = 30.0  # "returns at all": a call overrunning the worker's timeout is killed at 5 s


@pytest.fixture
def verdicts_not_fallbacks(caplog):
    """correctness_reward scores 0 when anything inside it fails (a reward must never take the
    loop down), which would make a test expecting 0 pass for the wrong reason: fail the test if
    the fallback logged anything."""
    yield
    swallowed = [r.getMessage() for r in caplog.records if r.name == rewards.logger.name]
    assert not swallowed, swallowed


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),  # the last box
        (r"x = \boxed{\frac{3}{4}}", r"\frac{3}{4}"),  # nested braces
        (r"\boxed{5} and later \boxed{", "5"),  # an unclosed box is ignored
        (r"\boxed{} but 7", "7"),  # an empty box is ignored
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,000\nthanks", "1,000"),
        ("The answer is $18.00. Then 3 more.", "$18.00"),
        ("so THE ANSWER IS: 12 apples", "12 apples"),
        ("the final answer is -3.5.", "-3.5"),
        ("I got 3, then 4, finally 1,250.", "1,250"),
        ("half of it: 3/4", "3/4"),
        ("it fell to -12 degrees", "-12"),
        ("from 10-3 we get", "3"),  # a minus between numbers is not a sign
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extraction_order():
    text = "the answer is 1\n#### 2\n" + r"\boxed{3} 4"
    assert extract_answer(text) == "3"
    assert extract_answer(text.replace(r"\boxed{3}", "")) == "2"
    assert extract_answer("the answer is 1. Later 4") == "1"
    assert extract_answer(None) is None


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"\boxed{72}", "72"),
        (r"\boxed{1,000}", "1000"),
        (r"\boxed{1000}", "1,000"),
        ("#### 1,000", "1000"),
        ("The answer is $18.00.", "18"),
        (r"\boxed{\$18}", "18"),
        ("the answer is 18 dollars.", "18"),
        (r"\boxed{\frac{3}{4}}", "3/4"),
        (r"\boxed{\dfrac{3}{4}}", "0.75"),
        ("so 3/4 of the cake", r"\frac{3}{4}"),
        (r"\boxed{0.75}", r"\frac{3}{4}"),
        (r"\boxed{-5}", "-5"),
        ("it fell to -5 degrees", "-5"),
        ("the answer is 2.5", "2.50"),
        (r"\boxed{50\%}", "50"),
        ("The answer is: **42**.", "42"),
        (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
    ],
)
@pytest.mark.usefixtures("verdicts_not_fallbacks")
def test_correct_answers_score_one(completion, answer):
    assert correctness_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"\boxed{71}", "72"),
        ("#### 5", "-5"),
        (r"\boxed{0.333}", r"\frac{1}{3}"),  # floats are compared to 6 decimals
        (r"\boxed{18 dollars}", "18"),  # inside a box, words are symbols: 18·d·o·l·l·a·r·s
        (r"\boxed{1,2}", "12"),  # a box reads "1,2" as the set {1, 2}
        (r"\boxed{72} but the answer is 72", "73"),
        (r"\boxed{}", "5"),
        ("no answer at all", "5"),
        ("", "5"),
        (r"\boxed{5}", ""),
    ],
)
@pytest.mark.usefixtures("verdicts_not_fallbacks")
def test_wrong_or_missing_answers_score_zero(completion, answer):
    assert correctness_reward(completion, answer) == 0.0


@pytest.mark.parametrize("bad", [None, 5, 5.0, b"5", ["5"]])
def test_non_strings_score_zero(bad):
    assert correctness_reward(bad, "5") == 0.0
    assert correctness_reward(r"\boxed{5}", bad) == 0.0
    assert format_reward(bad) == 0.0
    assert exact_match_reward(bad, "5") == 0.0


ADVERSARIAL = [
    r"\boxed{9^{9^{9^{9^{9}}}}}",
    r"\boxed{100000000!}",
    r"\boxed{(10^{100000000})!}",
    r"\boxed{2^{2^{40}}}",
    "\\boxed{" * 100_000,
    "\\boxed{" * 50_000 + "}" * 50_000,
    "{" * 1_000_000,
    "}" * 1_000_000,
    "1" * 1_000_000,
    "1," * 500_000,
    "1." * 500_000,
    "-" * 1_000_000 + "1",
    "the answer is " * 70_000,
    "#### " * 200_000,
    " " * 1_000_000 + r"\boxed" + " " * 1_000_000,
    "∑∫√≈≠ 数学 ٣ ５ 🙂" * 20_000,
    "\x00" * 1000 + r"\boxed{5}" + "\x00",
    "\ud800\udfff lone surrogates \\boxed{\ud800}",
    r"\frac{1}{0}",
    r"\boxed{\frac{1}{0}}",
    "1e999999999",
    r"\boxed{1e999999999}",
    r"\boxed{}",
    "",
    r"\boxed{\left( \right.}",
    r"\boxed{\begin{pmatrix}" + "1&" * 100 + r"\end{pmatrix}}",
]


@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_return_within_bound(completion):
    start = time.perf_counter()
    assert correctness_reward(completion, "5") in (0.0, 1.0)
    assert time.perf_counter() - start < HANG_BOUND_S
    assert format_reward(completion) in (0.0, 1.0)


def test_overrunning_worker_is_killed_and_restarted(monkeypatch, caplog):
    """A reply later than the timeout scores 0 (logged, not memoised); the next call gets a
    fresh worker and the real verdict."""
    monkeypatch.setattr(rewards, "CALL_TIMEOUT_S", 0.0)
    assert correctness_reward(r"\boxed{123457}", "123457") == 0.0
    assert rewards._WORKER._proc is None  # killed
    assert any("timed out" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert correctness_reward(r"\boxed{123457}", "123457") == 1.0  # the timeout was not cached


def test_an_error_inside_math_verify_is_logged_not_silent(caplog):
    """The worker sends an exception back instead of a verdict: it scores 0 with a warning
    (so ``verdicts_not_fallbacks`` catches it), and the worker stays up."""
    verdict = rewards._WORKER.ask('["only", "two"]')  # equal() takes three arguments
    assert verdict is None
    assert any("math-verify raised" in r.getMessage() and "TypeError" in r.getMessage() for r in caplog.records)
    assert rewards._WORKER.ask(json.dumps(["7", True, "7"])) is True


def test_a_math_verify_timeout_is_no_verdict_and_asked_again(caplog):
    """math-verify's own 1-second limit runs out on this comparison: the worker reports the
    ``TimeoutException`` instead of a False, and since nothing is memoised, the second call asks
    math-verify again (and logs again)."""
    for _ in range(2):
        caplog.clear()
        assert correctness_reward(r"\boxed{9^{9^{9^{9^{9}}}}}", "5") == 0.0
        assert any("TimeoutException" in r.getMessage() for r in caplog.records)


OVERLOADED_MATH_VERIFY = '''"""math_verify as it behaves on a badly overloaded machine: every comparison runs
out of its time limit, and says False for it unless asked to raise (as math-verify 0.9 does)."""


class TimeoutException(BaseException):
    pass


class LatexExtractionConfig:
    pass


ExprExtractionConfig = LatexExtractionConfig


def parse(pred, extraction_config, parsing_timeout=5, raise_on_error=False):
    return [pred]


def verify(gold, target, timeout_seconds=5, raise_on_error=False):
    if raise_on_error:
        raise TimeoutException("Timeout during comparison")
    return False
'''


def test_a_right_answer_that_timed_out_scores_one_once_math_verify_answers(tmp_path, monkeypatch, caplog):
    """A worker that imports OVERLOADED_MATH_VERIFY scores a right answer 0 without raising;
    that 0 is not memoised, so once a worker with the real math-verify answers, it scores 1."""
    (tmp_path / "math_verify.py").write_text(OVERLOADED_MATH_VERIFY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path), prepend=os.pathsep)
    rewards._WORKER.stop()  # the next call starts a worker that imports the fake
    try:
        assert correctness_reward(r"\boxed{271828}", "271828") == 0.0
    finally:
        monkeypatch.undo()
        rewards._WORKER.stop()  # the next call starts a worker with the real math-verify
    assert correctness_reward(r"\boxed{271828}", "271828") == 1.0
    assert any("TimeoutException: Timeout during comparison" in r.getMessage() for r in caplog.records)


def test_memoised_answers_skip_the_worker():
    correctness_reward(r"\boxed{31415}", "31415")
    hits = rewards._verdict.cache_info().hits
    assert correctness_reward(r"The sum is \boxed{31415}", "31415") == 1.0
    assert rewards._verdict.cache_info().hits == hits + 1


def test_calls_from_other_threads_work_and_are_bounded():
    cases = [(rf"\boxed{{{n}}}", str(n), 1.0) for n in range(8)]
    cases += [(rf"\boxed{{{n}}}", str(n + 1), 0.0) for n in range(8)]
    cases += [(r"\boxed{9^{9^{9^{9^{9}}}}}", "5", 0.0)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda case: correctness_reward(case[0], case[1]), cases))
    assert got == [expected for _, _, expected in cases]
    assert time.perf_counter() - start < HANG_BOUND_S


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=300), st.text(max_size=30))
def test_any_text_scores_zero_or_one(completion, answer):
    assert correctness_reward(completion, answer) in (0.0, 1.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_boxed_integers_are_correct(n):
    assert correctness_reward(rf"\boxed{{{n}}}", str(n)) == 1.0
    assert correctness_reward(rf"\boxed{{{n:,}}}", str(n)) == 1.0
    assert correctness_reward(f"so {n:,} in all", f"{n:,}") == 1.0
    assert correctness_reward(rf"\boxed{{{n + 1}}}", str(n)) == 0.0


# ----------------------------------------------------------------------------- format, exact match


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"so the answer is \boxed{42}.", 1.0),
        (r"\boxed{\frac{3}{4}}", 1.0),
        (r"\boxed{1} \boxed{2}", 0.0),  # two boxes: which is the answer?
        (r"\boxed{}", 0.0),
        (r"\boxed{  }", 0.0),
        (r"\boxed{42", 0.0),  # never closed
        (r"\boxed{\boxed{42}}", 0.0),
        ("#### 42", 0.0),
        ("42", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [("123", "123", 1.0), (" 123\n", "123", 1.0), ("123", " 123 ", 1.0), ("0123", "123", 0.0),
     ("12", "123", 0.0), ("", "", 1.0), ("", "1", 0.0)],
)  # fmt: skip
def test_exact_match_reward(completion, answer, expected):
    assert exact_match_reward(completion, answer) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [("068", "68", 1.0), ("68", "68", 1.0), (" 0068\n", "68", 1.0), ("0", "0", 1.0), ("000", "0", 1.0),
     ("69", "68", 0.0), ("6 8", "68", 0.0), ("", "68", 0.0), ("-68", "68", 0.0), ("٦٨", "68", 0.0),
     ("9" * 100, "9", 0.0), (None, "1", 0.0)],
)  # fmt: skip
def test_number_match_reward(completion, answer, expected):
    """Leading zeros do not change a number's value; anything but plain ASCII digits scores 0."""
    assert number_match_reward(completion, answer) == expected
