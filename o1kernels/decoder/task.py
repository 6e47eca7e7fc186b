"""Synthetic verifiable task: multi-step arithmetic written one step per line.

A problem is a chain of 2-digit additions and subtractions. Prompt and worked solution::

    Q:17+25-9+38\\n          prompt
    17+25=42\\n              step 1
    42-9=33\\n               step 2
    33+38=71\\n              step 3
    A:71<eos>               answer step

Every step is a line that ends with the step separator "\\n" (one token); the answer line ends
with <eos> instead, so each step ends in exactly one separator token, where the PRM scores it.
Each step has exactly one correct text, so it can be checked; so can the final answer.
Intermediate results stay in [0, max_value].

The tokenizer is character level (`CharTokenizer`): <pad> <bos> <eos>, the ten digits and "+-=\\nQA:".
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

STEP_SEPARATOR = "\n"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARS = "0123456789+-=\nQA:"

_PROMPT_RE = re.compile(r"^Q:(\d+(?:[+-]\d+)+)\n?$")
_ANSWER_RE = re.compile(r"A:(-?\d+)")
_STEP_RE = re.compile(r"^(\d+)([+-])(\d+)=(-?\d+)\n$")
_ANSWER_STEP_RE = re.compile(r"^A:(-?\d+)$")
# What went wrong at a chain's first wrong step (see step_error_kinds).
ERROR_KINDS = ("result", "copy", "operand", "skip", "early_answer", "answer", "extra_step", "format")


class CharTokenizer:
    """Character-level tokenizer of the task: ids 0..2 are <pad>, <bos>, <eos>, then one id per char of CHARS."""

    def __init__(self):
        self.vocab = [PAD, BOS, EOS, *CHARS]
        self._ids = {c: i for i, c in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.step_id = self._ids[STEP_SEPARATOR]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Text -> token ids (ValueError naming the first character outside the vocabulary)."""
        bad = [c for c in text if c not in CHARS]
        if bad:
            raise ValueError(f"text contains {bad[0]!r}, which is not in the task vocabulary {CHARS!r}")
        ids = [self._ids[c] for c in text]
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids) -> str:
        """Token ids -> text; <pad>/<bos>/<eos> are dropped, ids outside the vocabulary become U+FFFD."""
        return "".join(self.vocab[i] if i < len(self.vocab) else "\ufffd" for i in ids if i > self.eos_id)


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty: number of operands, operand range, bound on every intermediate result."""

    min_operands: int = 3
    max_operands: int = 5
    min_operand: int = 1
    max_operand: int = 49
    max_value: int = 99

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"need 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}")
        # 2 * max_operand <= max_value guarantees that "+" or "-" keeps any running value in range.
        if not (0 <= self.min_operand <= self.max_operand and 2 * self.max_operand <= self.max_value):
            raise ValueError("need 0 <= min_operand <= max_operand <= max_value / 2, got "
                             f"{self.min_operand}, {self.max_operand}, {self.max_value}")


@dataclass(frozen=True)
class Problem:
    """operands[0] op[0] operands[1] op[1] ... evaluated left to right."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self):
        if len(self.operands) != len(self.ops) + 1 or not self.ops:
            raise ValueError(f"a problem needs k >= 2 operands and k - 1 ops, got {self.operands}, {self.ops}")
        if any(op not in "+-" for op in self.ops) or any(v < 0 for v in self.operands):
            raise ValueError(f"ops must be '+'/'-' and operands non-negative, got {self.operands}, {self.ops}")

    @property
    def prompt(self) -> str:
        expr = str(self.operands[0]) + "".join(op + str(v) for op, v in zip(self.ops, self.operands[1:]))
        return f"Q:{expr}\n"

    def running_values(self) -> list[int]:
        """The value after each operation: [v1, v2, ..., answer]."""
        vals, acc = [], self.operands[0]
        for op, v in zip(self.ops, self.operands[1:]):
            acc = acc + v if op == "+" else acc - v
            vals.append(acc)
        return vals

    @property
    def answer(self) -> int:
        return self.running_values()[-1]

    def solution_steps(self) -> list[str]:
        """The correct steps, each with its separator; the answer step ends without one (<eos> follows)."""
        steps, acc = [], self.operands[0]
        for op, v, new in zip(self.ops, self.operands[1:], self.running_values()):
            steps.append(f"{acc}{op}{v}={new}{STEP_SEPARATOR}")
            acc = new
        return steps + [f"A:{self.answer}"]


def generate_problems(count: int, seed: int, config: TaskConfig = TaskConfig()) -> list[Problem]:
    """`count` problems drawn from random.Random(seed) (the same list for the same arguments)."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        k = rng.randint(config.min_operands, config.max_operands)
        acc = rng.randint(config.min_operand, config.max_operand)
        operands, ops = [acc], []
        for _ in range(k - 1):
            v = rng.randint(config.min_operand, config.max_operand)
            # Pick the op at random among those keeping the running value inside [0, max_value].
            allowed = [op for op, new in (("+", acc + v), ("-", acc - v)) if 0 <= new <= config.max_value]
            op = rng.choice(allowed)
            acc = acc + v if op == "+" else acc - v
            operands.append(v)
            ops.append(op)
        problems.append(Problem(tuple(operands), tuple(ops)))
    return problems


def parse_problem(text: str) -> Problem | None:
    """A Problem from its prompt "Q:17+25-9\\n" (the "Q:" and newline are optional), or None if it is not one."""
    text = text.strip()
    if not text.startswith("Q:"):
        text = "Q:" + text
    m = _PROMPT_RE.match(text)
    if m is None:
        return None
    parts = re.split(r"([+-])", m.group(1))
    return Problem(tuple(int(p) for p in parts[0::2]), tuple(parts[1::2]))


def split_steps(text: str) -> list[str]:
    """Generated text -> its steps, each keeping its trailing separator (the last may have none)."""
    steps, start = [], 0
    for i, c in enumerate(text):
        if c == STEP_SEPARATOR:
            steps.append(text[start:i + 1])
            start = i + 1
    if start < len(text):
        steps.append(text[start:])
    return steps


def extract_answer(text: str) -> int | None:
    """The integer after the first "A:" in generated text, or None."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


def check_steps(problem: Problem, steps: list[str]) -> list[bool]:
    """Per step: True iff the step is the expected one AND every earlier step was correct (the PRM label)."""
    expected = problem.solution_steps()
    labels, ok = [], True
    for i, step in enumerate(steps):
        ok = ok and i < len(expected) and step == expected[i]
        labels.append(ok)
    return labels


def step_error_kinds(problem: Problem, steps: list[str]) -> list[str | None]:
    """Per step: None while the chain is correct, then what its first wrong step did, then "after_error" for
    every later step. With v the true running value before the step, the expected step "v op x=w":
      "copy"          the step starts from a value other than v (op and operand right),
      "skip"          its operation is a later one of the problem's (its op and operand come later),
      "operand"       its op or operand is otherwise not the expected one,
      "result"        "v op x=c" with c != w,
      "early_answer"  an answer line where an operation is still due,
      "answer"        the answer line with a value other than the answer,
      "extra_step"    an operation line after the last operation,
      "format"        anything else (unparseable text, a truncated line).
    The labels of check_steps are exactly the steps with kind None."""
    expected = problem.solution_steps()
    values = [problem.operands[0], *problem.running_values()]
    operations = list(zip(problem.ops, problem.operands[1:]))
    kinds: list[str | None] = []
    for i, step in enumerate(steps):
        if kinds and kinds[-1] is not None:
            kinds.append("after_error")
            continue
        if i < len(expected) and step == expected[i]:
            kinds.append(None)
            continue
        line, answer = _STEP_RE.match(step), _ANSWER_STEP_RE.match(step)
        if answer is not None:
            kinds.append("early_answer" if i < len(operations) else "answer")
        elif line is None:
            kinds.append("format")
        elif i >= len(operations):
            kinds.append("extra_step")
        else:
            a, op, x, c = int(line.group(1)), line.group(2), int(line.group(3)), int(line.group(4))
            if (op, x) == operations[i]:
                kinds.append("copy" if a != values[i] else "result" if c != values[i + 1] else "format")
            elif (op, x) in operations[i + 1:]:
                kinds.append("skip")
            else:
                kinds.append("operand")
    return kinds


def is_correct(problem: Problem, text: str) -> bool:
    """True iff the generated text's final answer equals the problem's answer."""
    return extract_answer(text) == problem.answer
