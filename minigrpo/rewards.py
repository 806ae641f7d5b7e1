"""Verifiable rewards: is the final answer right, and is it where we asked for it?

GRPO needs one scalar reward r_i per completion o_i.  For maths word problems that reward can be
*verified* instead of learned: pull the final answer out of the text and check it against the
gold answer.  No reward model, nothing to hack but the answer itself.

Extraction (``extract_answer``), first rule that finds something wins:

1. the last complete ``\\boxed{…}`` (braces balanced, so ``\\boxed{\\frac{3}{4}}`` works);
2. the rest of the line after the last ``####`` and a space (GSM8K's own answer marker;
   ``####4`` is no marker);
3. after the last "the answer is" / "the final answer is" (any case), up to the first full
   stop followed by whitespace or the end of the text, or to the end of the line (``!`` and
   ``?`` end nothing: "The answer is 7! Then 9." gives ``7! Then 9``);
4. the last number in the text: ``-12``, ``1,000``, ``3.5``, ``3/4``.

Every regex here is linear in the length of the text (no nested quantifiers that can
backtrack), so a megabyte of adversarial text costs well under a second.

Comparison (``correctness_reward``) is delegated to Hugging Face's math-verify, which parses
both answers into sympy and compares them: ``1,000`` = ``1000``, ``$18.00`` = ``18``,
``3/4`` = ``\\frac{3}{4}`` = ``0.75``, ``50%`` = ``50``.  A boxed answer is parsed as LaTeX
(``\\boxed{…}``); a plain-text answer is parsed as text, so ``18 dollars`` after "the answer is"
counts as 18, while ``\\boxed{18 dollars}`` is the product 18·d·o·l·l·a·r·s and does not.

Time bound.  A model can write ``\\boxed{9^{9^{9^{9}}}}`` and sympy will try to evaluate it.
math-verify bounds its own work with ``signal.alarm``, which only exists in the main thread
(called from any other thread, math-verify raises ``ValueError``) and which takes over the
host's SIGALRM.  So math-verify runs in one persistent worker process (a plain subprocess of
this file, not ``multiprocessing``, so a reader's script is never re-imported), on every call
from every thread: one code path.  Only a verdict (equal or not) is memoised on (answer, gold),
so a group of G completions that agree costs one comparison.  When there is no verdict the call
scores 0, a warning on this module's logger says why, and nothing is memoised: the same pair is
asked again next time.  There is no verdict when

* the worker overruns ``CALL_TIMEOUT_S`` seconds or dies: it is killed and restarted at the next
  call (warning "math-verify worker timed out or died");
* math-verify raises, or runs out of one of its own 1-second time limits (one per parse and per
  comparison, which a loaded machine can hit on a right answer).  The worker calls it with
  ``raise_on_error=True``, so these surface as exceptions instead of a silent ``False``, and
  sends the exception back (warning "math-verify raised on …: TimeoutException: …").  An
  answer that always overruns, such as ``\\boxed{9^{9^{9^{9}}}}``, costs its time limit on
  every call.

The worker silences no logging; anything its libraries log goes to stderr.  Answers longer than
``MAX_ANSWER_CHARS`` score 0 without being parsed (a deliberate 0, not logged).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading

__all__ = ["correctness_reward", "exact_match_reward", "extract_answer", "format_reward", "number_match_reward"]

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 256
"""extracted or gold answers longer than this score 0 (GSM8K answers are < 10 characters)"""
CALL_TIMEOUT_S = 5.0
"""longest a single comparison may take before the worker is killed and the reward is 0"""
STARTUP_TIMEOUT_S = 60.0
"""longest the worker may take to import math-verify (sympy) on a slow machine"""

# ----------------------------------------------------------------------------- extraction

_BOXED_OR_BRACE = re.compile(r"\\boxed\s*\{|[{}]")
_BOXED = re.compile(r"\\boxed")
_ANSWER_IS = re.compile(r"the (?:final )?answer is:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")


def _boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of every complete ``\\boxed{…}``, in closing order.

    One left-to-right pass with a stack of open braces (content start for a ``\\boxed{``,
    -1 for a plain ``{``); unbalanced ``}`` are ignored and unclosed ``\\boxed{`` dropped.
    Braces before the first ``\\boxed`` cannot change how later braces pair, so the pass
    starts there.  Spans, not substrings: 50,000 nested boxes would copy gigabytes.
    """
    spans, stack = [], []
    first = text.find("\\boxed")
    for match in _BOXED_OR_BRACE.finditer(text, first if first >= 0 else len(text)):
        token = match.group()
        if token == "}":
            if stack and (start := stack.pop()) >= 0:
                spans.append((start, match.start()))
        else:
            stack.append(-1 if token == "{" else match.end())
    return spans


def _after_marker(text: str) -> str | None:
    """The rest of the line after the last ``####`` and a space, GSM8K's answer marker."""
    start = text.rfind("#### ")
    if start < 0:
        return None
    return text[start + 5 :].split("\n", 1)[0].strip() or None


def _after_answer_is(text: str) -> str | None:
    """What follows the last "the answer is", up to the first full stop followed by whitespace
    or the end of the text, or to the end of the line."""
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() :].split("\n", 1)[0]
    end = _SENTENCE_END.search(tail)
    tail = tail[: end.start()] if end else tail
    return tail.strip().rstrip(".").strip() or None


def _last_number(text: str) -> str | None:
    """The last number in the text: optional sign, thousands commas, decimals, ``a/b``."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group() if last else None


def _extract(completion: str) -> tuple[str, bool] | None:
    """(answer, came_from_boxed) by the four rules of the module docstring, or None."""
    boxed = _boxed_spans(completion)
    if boxed and (last := completion[slice(*boxed[-1])].strip()):
        return last, True
    for rule in (_after_marker, _after_answer_is, _last_number):
        answer = rule(completion)
        if answer:
            return answer, False
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer stated in ``completion``, or None: last ``\\boxed{…}``, else after
    ``####`` and a space, else after "the answer is", else the last number.  Never raises."""
    if not isinstance(completion, str):
        return None
    found = _extract(completion)
    return found[0] if found else None


# ----------------------------------------------------------------------------- the rewards


def correctness_reward(completion: str, answer: str) -> float:
    """r = 1 if the extracted final answer equals the gold ``answer`` (math-verify), else 0.

    ``answer`` may be a GSM8K number ("1,000", "18") or LaTeX ("\\frac{3}{4}").  Never raises,
    never takes longer than about ``CALL_TIMEOUT_S`` (plus the worker's start-up, once); any
    non-string input scores 0.
    """
    try:
        if not isinstance(completion, str) or not isinstance(answer, str):
            return 0.0
        found = _extract(completion)
        gold = answer.strip()
        if found is None or not gold or max(len(found[0]), len(gold)) > MAX_ANSWER_CHARS:
            return 0.0
        return 1.0 if _math_equal(found[0], found[1], gold) else 0.0
    except Exception:  # a reward must never take the training loop down
        logger.warning("correctness_reward failed; scoring 0", exc_info=True)
        return 0.0


def format_reward(completion: str, answer: str | None = None) -> float:
    """r = 1 if the completion states its answer in exactly one non-empty ``\\boxed{…}``.

    The GSM8K chapter's prompt asks for the final answer in ``\\boxed{}``; this reward pays for
    following that instruction (one box, closed, not empty) whether or not the answer is right,
    so a model learns the format that makes its answers checkable.  ``answer`` is ignored (it is
    there so that every reward function is called as r(completion, answer)).  Never raises.
    """
    if not isinstance(completion, str):
        return 0.0
    boxed = _boxed_spans(completion)
    one_box = len(boxed) == 1 and len(_BOXED.findall(completion)) == 1
    return 1.0 if one_box and completion[slice(*boxed[0])].strip() else 0.0


def exact_match_reward(completion: str, answer: str) -> float:
    """r = 1 if ``completion.strip() == answer.strip()``, else 0: the arithmetic task's reward,
    where the model writes only the digits of the sum.  Never raises."""
    if not isinstance(completion, str) or not isinstance(answer, str):
        return 0.0
    return 1.0 if completion.strip() == answer.strip() else 0.0


def number_match_reward(completion: str, answer: str) -> float:
    """r = 1 if the completion is a string of digits whose value is the answer's, else 0: the
    padded-answer task's reward, where ``"068"`` and ``"68"`` are both right.  Never raises."""
    if not isinstance(completion, str) or not isinstance(answer, str):
        return 0.0
    text, gold = completion.strip(), answer.strip()
    if not (text.isascii() and text.isdigit() and gold.isascii() and gold.isdigit()) or len(text) > 64:
        return 0.0
    return 1.0 if int(text) == int(gold) else 0.0


# ----------------------------------------------------------------------------- math-verify worker


@functools.lru_cache(maxsize=1 << 16)
def _verdict(extracted: str, boxed: bool, gold: str) -> bool:
    """math-verify's verdict on (extracted, gold), memoised; raises ``_NoVerdict`` (never cached,
    so the next call asks again) when the worker timed out, died or math-verify raised."""
    verdict = _WORKER.ask(json.dumps([extracted, boxed, gold]))
    if verdict is None:
        raise _NoVerdict
    return verdict


class _NoVerdict(Exception):
    """The worker gave no verdict (its reason is logged as a warning)."""


def _math_equal(extracted: str, boxed: bool, gold: str) -> bool:
    """True if math-verify says the two answers are equal; False when it says not, or gives no
    verdict (the warning says why; the pair is asked again next time)."""
    try:
        return _verdict(extracted, boxed, gold)
    except _NoVerdict:
        return False


class _Worker:
    """One subprocess running ``_serve``, asked one JSON line at a time under a lock.

    A reader thread moves the worker's reply lines into a queue, so waiting for a reply has a
    timeout on every platform.  A worker that overruns, dies or was inherited through ``fork``
    is replaced at the next call.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._replies = None
        self._pid = os.getpid()

    def ask(self, request: str) -> bool | None:
        """The worker's verdict on one request: True, False, or None for no verdict (logged)."""
        if self._pid != os.getpid():  # forked child: the parent's pipes are not ours
            self.__init__()
        with self._lock:
            try:
                if self._proc is None and not self._start():
                    return None
                self._proc.stdin.write(request + "\n")
                self._proc.stdin.flush()
                reply = self._replies.get(timeout=CALL_TIMEOUT_S)
            except (OSError, ValueError, queue.Empty):
                reply = None
            if reply is None:
                logger.warning("math-verify worker timed out or died; restarting it, scoring 0")
                self.stop()
                return None
            if reply not in ("0", "1"):
                why = reply.removeprefix(_NO_VERDICT).strip()
                logger.warning("math-verify raised on %s: %s; scoring 0 this time, not memoised", request, why)
                return None
            return reply == "1"

    def _start(self) -> bool:
        code = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1])['_serve']()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="ascii",
        )  # fmt: skip
        self._replies = queue.Queue()
        threading.Thread(target=_pump, args=(self._proc.stdout, self._replies), daemon=True).start()
        try:
            ready = self._replies.get(timeout=STARTUP_TIMEOUT_S) == "ready"
        except queue.Empty:
            ready = False
        if not ready:
            logger.warning("math-verify worker failed to start; scoring 0")
            self.stop()
        return ready

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        self._proc = None


def _pump(stream, replies: queue.Queue) -> None:
    """Reader thread: one queue item per reply line; None when the worker's stdout closes."""
    try:
        for line in stream:
            replies.put(line.strip())
    except (OSError, ValueError):
        pass
    replies.put(None)


_WORKER = _Worker()
atexit.register(_WORKER.stop)


_NO_VERDICT = "?"
"""first character of the worker's reply when it has no verdict; the rest says why"""


def _serve() -> None:
    """Worker main loop: read ``[extracted, boxed, gold]`` lines, answer each with ``_reply``.

    Runs in its own main thread, so math-verify's own ``signal.alarm`` timeouts work here and
    usually answer before the parent's ``CALL_TIMEOUT_S``; the parent's kill is the backstop for
    anything they cannot interrupt.  Exits when the parent closes stdin.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]

    def equal(extracted: str, boxed: bool, gold: str) -> bool:
        """math-verify's verdict; raises (``raise_on_error``) where it would otherwise say False
        for an error or for running out of its time limit."""
        gold_parsed = parse(f"\\boxed{{{gold}}}", config, parsing_timeout=1, raise_on_error=True)
        text = f"\\boxed{{{extracted}}}" if boxed else extracted
        pred_parsed = parse(text, config, parsing_timeout=1, raise_on_error=True)
        if not (gold_parsed and pred_parsed):
            return False
        return verify(gold_parsed, pred_parsed, timeout_seconds=1, raise_on_error=True)

    _reply(equal, '["1", true, "1"]')  # warm up sympy's lazy imports; a timeout here is harmless
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        replies.write(_reply(equal, line) + "\n")
        replies.flush()


def _reply(equal, request: str) -> str:
    """The worker's one-line ASCII answer to one request: ``1`` or ``0`` for ``equal``'s verdict,
    or ``_NO_VERDICT`` and the exception when it raised.  Catches ``BaseException`` because
    math-verify's ``TimeoutException`` is one."""
    try:
        return "1" if equal(*json.loads(request)) else "0"
    except BaseException as error:  # reported, not hidden: the parent logs it and scores 0
        why = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        return f"{_NO_VERDICT} {why}".encode("ascii", "replace").decode()
