"""The synthetic arithmetic task: generator, tokenizer, step checker, answer extraction."""
import pytest

from o1kernels.decoder.task import (
    ERROR_KINDS, CharTokenizer, Problem, TaskConfig, check_steps, extract_answer, generate_problems, is_correct,
    parse_problem, split_steps, step_error_kinds,
)


def _evaluate(expr: str) -> int:
    """Independent left-to-right evaluation of "a+b-c..." (no Python eval)."""
    total, sign, num = 0, 1, ""
    for ch in expr + "+":
        if ch.isdigit():
            num += ch
        else:
            total += sign * int(num)
            sign, num = (1 if ch == "+" else -1), ""
    return total


def test_generator_is_deterministic_and_seed_dependent():
    assert generate_problems(50, 7) == generate_problems(50, 7)
    assert generate_problems(50, 7) != generate_problems(50, 8)


@pytest.mark.parametrize("config", [TaskConfig(), TaskConfig(min_operands=2, max_operands=2, min_operand=1, max_operand=9,
                                                             max_value=20)])
def test_generated_problems_respect_the_config(config):
    for p in generate_problems(300, 1, config):
        assert config.min_operands <= len(p.operands) <= config.max_operands
        assert all(config.min_operand <= v <= config.max_operand for v in p.operands)
        assert all(0 <= v <= config.max_value for v in p.running_values())
        assert p.answer == _evaluate(p.prompt[2:-1])


def test_solution_format_and_checker():
    p = Problem((17, 25, 9, 38), ("+", "-", "+"))
    assert p.prompt == "Q:17+25-9+38\n"
    steps = p.solution_steps()
    assert steps == ["17+25=42\n", "42-9=33\n", "33+38=71\n", "A:71"]
    assert check_steps(p, steps) == [True] * 4
    assert is_correct(p, "".join(steps)) and extract_answer("".join(steps)) == 71
    # A wrong step makes it and every later step wrong, even later steps that are arithmetically right.
    bad = ["17+25=43\n", "43-9=34\n", "34+38=72\n", "A:72"]
    assert check_steps(p, bad) == [False] * 4
    assert check_steps(p, [steps[0], "42-9=32\n", "32+38=70\n", "A:70"]) == [True, False, False, False]
    # Too many steps, or an early answer, are wrong.
    assert check_steps(p, steps + ["A:71"]) == [True] * 4 + [False]
    assert check_steps(p, [steps[0], "A:42"]) == [True, False]
    assert not is_correct(p, "17+25=42\n") and extract_answer("17+25=42\n") is None


@pytest.mark.parametrize("steps,kinds", [
    (["17+25=42\n", "42-9=33\n", "33+38=71\n", "A:71"], [None] * 4),
    (["17+25=43\n", "43-9=34\n", "34+38=72\n", "A:72"], ["result"] + ["after_error"] * 3),
    (["17+25=42\n", "41-9=32\n"], [None, "copy"]),
    (["17+25=42\n", "17-9=8\n"], [None, "copy"]),  # started from the previous step's operand
    (["17+25=42\n", "42+38=80\n", "A:80"], [None, "skip", "after_error"]),
    (["17+25=42\n", "42-8=34\n"], [None, "operand"]),
    (["17+25=42\n", "42+9=51\n"], [None, "operand"]),  # sign flipped
    (["17+25=42\n", "A:42"], [None, "early_answer"]),
    (["17+25=42\n", "42-9=33\n", "33+38=71\n", "A:70"], [None] * 3 + ["answer"]),
    (["17+25=42\n", "42-9=33\n", "33+38=71\n", "71+38=109\n", "A:109"], [None] * 3 + ["extra_step", "after_error"]),
    (["17+25=42\n", "42-9=:3\n"], [None, "format"]),
    (["17+25=42\n", "42-9=3"], [None, "format"]),  # truncated: no separator
    (["17+25=042\n"], ["format"]),
])
def test_step_error_kinds(steps, kinds):
    p = Problem((17, 25, 9, 38), ("+", "-", "+"))
    assert step_error_kinds(p, steps) == kinds
    assert [k is None for k in kinds] == check_steps(p, steps)
    assert all(k in (None, "after_error", *ERROR_KINDS) for k in kinds)


def test_step_error_kinds_agree_with_the_checker_on_random_chains():
    rng = __import__("random").Random(0)
    for p in generate_problems(200, 11):
        steps = p.solution_steps()
        # Perturb one random character of one random step (digits, ops, separators) and maybe truncate.
        i = rng.randrange(len(steps))
        j = rng.randrange(len(steps[i]))
        steps[i] = steps[i][:j] + rng.choice("0123456789+-=\n") + steps[i][j + 1:]
        steps = steps[:rng.randint(1, len(steps))]
        kinds = step_error_kinds(p, steps)
        assert [k is None for k in kinds] == check_steps(p, steps)
        first = next((k for k in kinds if k is not None), None)
        assert all(k == "after_error" for k in kinds[kinds.index(first) + 1:]) if first else True


def test_split_steps_keeps_separators():
    assert split_steps("1+2=3\n3+4=7\nA:7") == ["1+2=3\n", "3+4=7\n", "A:7"]
    assert split_steps("1+2=3\n") == ["1+2=3\n"]
    assert split_steps("") == []


def test_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    p = generate_problems(1, 0)[0]
    text = p.prompt + "".join(p.solution_steps())
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert len(set(tok.vocab)) == len(tok) and tok.vocab[tok.step_id] == "\n"
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("12x3")


def test_parse_problem():
    assert parse_problem("Q:17+25-9\n") == Problem((17, 25, 9), ("+", "-"))
    assert parse_problem("3-1") == Problem((3, 1), ("-",))
    for bad in ("", "17", "Q:17+", "hello", "1*2"):
        assert parse_problem(bad) is None


@pytest.mark.parametrize("kwargs", [dict(min_operands=1), dict(min_operands=4, max_operands=3),
                                    dict(max_operand=600, max_value=999), dict(min_operand=-1)])
def test_bad_task_config(kwargs):
    with pytest.raises(ValueError):
        TaskConfig(**kwargs)
