"""Synthetic tasks: worked solutions are right, code references pass their tests, splits are disjoint."""

import ast
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from align.tasks import (
    FAMILIES,
    TaskDataConfig,
    corpus_texts,
    extract_boxed_answer,
    generate_problems,
    normalize_problem_text,
    select_levels,
    write_task_data,
)
from align.tasks.__main__ import main as tasks_main

SMALL = TaskDataConfig(arithmetic_sft=200, code_sft=120, arithmetic_prompts=60, code_prompts=40, eval_per_level=8)
# `47 + 38: 7+8=15, 4+3+1=8, so 85`, or `47 * (-16) = -752` when a product of two multi-digit numbers has no work.
STEP = re.compile(r"^(-?\d+) ([-+*]) (\(-\d+\)|\d+)(?:: (.+), so | = )(-?\d+)$")
REWRITE = re.compile(r"^(\d+) ([-+*]) (\d+): ")
COLUMN = re.compile(r"^(\d+)([-+*])(\d)(?:([-+])(\d))?=(\d+)$")
EXPRESSION = re.compile(r"^What is (.+)\?$")


def safe_eval(text: str) -> int:
    """Evaluates integer +, -, * and parentheses only; anything else is an error."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
            a, b = walk(node.left), walk(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
        raise ValueError(f"not allowed: {ast.dump(node)}")

    return walk(ast.parse(text, mode="eval").body)


def profile(expression: str) -> tuple[int, bool, bool, int]:
    """(operand count, has *, has parentheses, digits of the largest operand) of an expression."""
    operands = [int(n) for n in re.findall(r"\d+", expression)]
    return len(operands), "*" in expression, "(" in expression, len(str(max(operands)))


# Runs each {"code", "tests"} in a fresh namespace; prints, per item, whether every assert passed.
RUNNER = """
import json, sys
results = []
for item in json.load(sys.stdin):
    namespace = {}
    try:
        exec(item["code"], namespace)
        for test in item["tests"]:
            exec(test, namespace)
        results.append(True)
    except Exception:
        results.append(False)
print(json.dumps(results))
"""


def run_in_subprocess(items: list[dict]) -> list[bool]:
    out = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(items), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> dict[str, Path]:
    """The default-size splits (about a second to write)."""
    return write_task_data(tmp_path_factory.mktemp("tasks"), TaskDataConfig(), seed=0)


# ---- answer parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{133}.", "133"),
        ("\\boxed{-7}", "-7"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{ 3 }.", "3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}{b{c}}} and more", "{a}{b{c}}"),
        ("\\boxed{5} then an unclosed \\boxed{6", "5"),
        ("no box here: 42", None),
        ("\\boxed{", None),
        ("", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


def check_column_work(a: int, op: str, b: int, work: str, result: int) -> None:
    """The digit-level work of `a op b` uses the operands' digits, units first, each column's arithmetic is right,
    carries and borrows come from the column before, and the columns' digits spell |result|."""
    rewrite = REWRITE.match(work)
    if rewrite:  # the unsigned operation the signed one reduces to
        x, unsigned_op, y = int(rewrite[1]), rewrite[2], int(rewrite[3])
        work = work[rewrite.end():]
    else:
        x, unsigned_op, y = a, op, b
    assert x >= 0 and y >= 0 and abs(result) == abs(safe_eval(f"{x} {unsigned_op} {y}")), (a, op, b, work)
    columns = [COLUMN.match(c).groups() for c in work.split(", ")]
    width = len(str(x)) if unsigned_op == "*" else max(len(str(x)), len(str(y)))
    assert len(columns) == width, work
    x_digits, y_digits = ([int(d) for d in reversed(str(n).zfill(width))] for n in (x, y))
    carry, values = 0, []
    for i, (top, column_op, digit, _, carry_in, value) in enumerate(columns):
        top, digit, value = int(top), int(digit), int(value)
        assert column_op == unsigned_op and int(carry_in or 0) == carry, (work, i)
        if unsigned_op == "-":
            assert top % 10 == x_digits[i] and digit == y_digits[i] and top - digit - carry == value < 10
            carry = int(top >= 10)
        else:
            assert top == x_digits[i] and digit == (y if unsigned_op == "*" else y_digits[i])
            assert safe_eval(f"{top} {unsigned_op} {digit}") + carry == value
            carry = value // 10
        values.append(value)
    assert abs(result) == int(f"{values[-1]}" + "".join(str(v % 10) for v in reversed(values[:-1]))), work


# ---- arithmetic -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", FAMILIES["arithmetic"].levels)
def test_arithmetic_worked_solutions_are_correct(level):
    for problem in generate_problems("arithmetic", level, 300, seed=1):
        expression = EXPRESSION.match(problem.prompt).group(1)
        *steps, final = problem.solution.split("\n")
        assert final == f"The answer is \\boxed{{{problem.answer}}}."
        assert extract_boxed_answer(problem.solution) == problem.answer == str(safe_eval(expression))
        assert len(steps) == len(re.findall(r" [-+*] ", expression))  # one line per operation
        available = [int(n) for n in re.findall(r"\d+", expression)]  # literals, then results as they appear
        for step in steps:
            left, op, right, work, result = STEP.match(step).groups()
            assert safe_eval(f"{left} {op} {right}") == int(result), step
            if work is not None:
                check_column_work(int(left), op, safe_eval(right), work, int(result))
            for operand in (int(left), safe_eval(right)):
                assert operand in available, f"{step}: {operand} is neither a literal nor an earlier result"
                available.remove(operand)
            available.append(int(result))
        assert available == [int(problem.answer)]  # every literal and intermediate result used exactly once


def test_arithmetic_levels_are_measurably_distinct():
    expected = {  # (operands, has *, has parentheses, digits of the largest operand)
        1: {(2, False, False, 1), (2, False, False, 2)},
        2: {(3, False, False, 1), (3, False, False, 2)},
        3: {(3, True, False, 2)},
        4: {(4, True, True, 1), (4, True, True, 2)},
        5: {(5, True, True, 3)},
    }
    for level in FAMILIES["arithmetic"].levels:
        problems = generate_problems("arithmetic", level, 300, seed=2)
        profiles = {profile(EXPRESSION.match(p.prompt).group(1)) for p in problems}
        assert profiles <= expected[level], (level, profiles - expected[level])
        assert len({len(p.solution.split("\n")) for p in problems}) == 1  # same step count within a level


# ---- code -------------------------------------------------------------------------------------------------


def test_code_levels_are_measurably_distinct():
    for level in FAMILIES["code"].levels:
        for problem in generate_problems("code", level, 300, seed=3):
            (function,) = ast.parse(problem.answer).body
            annotations = {ast.unparse(arg.annotation) for arg in function.args.args}
            assert function.name == problem.entry_point
            assert 3 <= len(problem.tests) <= 5
            if level == 1:  # a single expression over ints
                assert annotations == {"int"} and len(function.body) == 1
            elif level == 2:  # a single pass over a list or a string
                assert annotations & {"list[int]", "str"} and len(function.body) == 1
            else:  # two steps
                assert annotations & {"list[int]", "str"} and len(function.body) == 2
    entry_points = [{p.entry_point for p in generate_problems("code", lvl, 300, seed=3)} for lvl in (1, 2, 3)]
    assert not (entry_points[0] & entry_points[1] or entry_points[1] & entry_points[2])


def test_code_reference_solutions_pass_and_wrong_ones_fail():
    problems = [p for level in FAMILIES["code"].levels for p in generate_problems("code", level, 200, seed=4)]
    assert all(p.solution == f"```python\n{p.answer}\n```" for p in problems)
    references = [{"code": p.answer, "tests": list(p.tests)} for p in problems]
    # A constant function fails by construction: every problem's tests expect at least two different outputs.
    constants = [
        {"code": f"def {p.entry_point}(*args):\n    return {p.tests[0].rsplit(' == ', 1)[1]}", "tests": list(p.tests)}
        for p in problems
    ]
    # Off-by-one: the first integer constant of the reference (a threshold, bound or factor) plus one.
    mutants = []
    for p in problems:
        tree = ast.parse(p.answer)
        constant = next((n for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is int), None)
        if constant is not None:
            constant.value += 1
            mutants.append({"code": ast.unparse(tree), "tests": list(p.tests)})
    results = run_in_subprocess(references + constants + mutants)
    n = len(problems)
    assert all(results[:n]), [p.prompt for p, ok in zip(problems, results, strict=True) if not ok]
    assert not any(results[n : 2 * n])
    mutant_results = results[2 * n :]
    assert len(mutant_results) > 0.8 * n
    assert sum(mutant_results) <= 0.05 * len(mutant_results)  # the tests catch nearly all off-by-one mutants


def test_code_problem_space_is_large():
    for level in FAMILIES["code"].levels:
        assert len(generate_problems("code", level, 2000, seed=5)) == 2000


# ---- splits and files -------------------------------------------------------------------------------------


def digest(paths: dict[str, Path]) -> dict[str, str]:
    return {split: hashlib.sha256(path.read_bytes()).hexdigest() for split, path in paths.items()}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first = write_task_data(tmp_path / "a", SMALL, seed=7)
    second = write_task_data(tmp_path / "b", SMALL, seed=7)
    other = write_task_data(tmp_path / "c", SMALL, seed=8)
    assert set(first) == {"sft", "prompts", "eval", "pairs", "pairs_eval"}
    assert digest(first) == digest(second)
    assert all(a != b for a, b in zip(digest(first).values(), digest(other).values(), strict=True))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "eval.jsonl", "pairs.jsonl", "pairs_eval.jsonl", "prompts.jsonl", "sft.jsonl"]


def test_eval_set_does_not_depend_on_training_sizes(tmp_path):
    small = write_task_data(tmp_path / "a", SMALL, seed=0)
    bigger = write_task_data(tmp_path / "b", replace(SMALL, arithmetic_sft=400, code_prompts=80), seed=0)
    assert small["eval"].read_bytes() == bigger["eval"].read_bytes()


def test_sizes_and_difficulty_mix(default_data):
    config = TaskDataConfig()
    rows = {split: read_jsonl(path) for split, path in default_data.items()}
    assert len(rows["sft"]) == config.arithmetic_sft + config.code_sft
    assert len(rows["prompts"]) == config.arithmetic_prompts + config.code_prompts
    assert len(rows["eval"]) == config.eval_per_level * (5 + 3)
    for family in config.families:
        for split in ("sft", "prompts", "eval"):
            counts = config.level_counts(family, split)
            got = {lvl: sum(r["family"] == family and r["difficulty"] == lvl for r in rows[split]) for lvl in counts}
            assert got == counts
    sft_levels = config.level_counts("arithmetic", "sft")
    assert sft_levels[1] > sft_levels[5]  # weighted towards easy


def test_splits_share_no_problem(default_data):
    def keys(split: str) -> list[str]:
        rows = read_jsonl(default_data[split])
        texts = [r["messages"][0]["content"] if split == "sft" else r["prompt"][0]["content"] for r in rows]
        return [normalize_problem_text(t) for t in texts]

    sft, prompts, evals = keys("sft"), keys("prompts"), keys("eval")
    assert len(set(sft)) == len(sft) and len(set(prompts)) == len(prompts) and len(set(evals)) == len(evals)
    assert not set(evals) & (set(sft) | set(prompts))
    assert not set(sft) & set(prompts)


def test_rows_load_with_datasets(default_data):
    datasets = pytest.importorskip("datasets")
    loaded = {
        split: datasets.load_dataset("json", data_files=str(path), split="train")
        for split, path in default_data.items()
    }
    assert set(loaded["sft"].column_names) == {"id", "family", "difficulty", "messages"}
    prompt_columns = {"id", "family", "difficulty", "prompt", "answer", "tests", "entry_point"}
    assert set(loaded["prompts"].column_names) == set(loaded["eval"].column_names) == prompt_columns
    assert loaded["sft"].num_rows == len(read_jsonl(default_data["sft"]))

    messages = loaded["sft"][0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    for row in loaded["eval"]:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        if row["family"] == "arithmetic":
            assert row["tests"] == [] and row["entry_point"] == "" and re.fullmatch(r"-?\d+", row["answer"])
        else:
            assert 3 <= len(row["tests"]) <= 5 and row["answer"].startswith(f"def {row['entry_point']}(")


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown task family"):
        TaskDataConfig(families=("poetry",))
    with pytest.raises(ValueError, match="code_sft"):
        TaskDataConfig(code_sft=-1)
    with pytest.raises(ValueError, match="arithmetic_sft_mix"):
        TaskDataConfig(arithmetic_sft_mix=(1.0, 1.0))
    assert sum(TaskDataConfig(code_sft=7).level_counts("code", "sft").values()) == 7


def test_generate_problems_is_a_prefix_stream():
    long = generate_problems("code", 2, 40, seed=0)
    assert generate_problems("code", 2, 10, seed=0) == long[:10]
    assert generate_problems("code", 2, 10, seed=1) != long[:10]


def test_corpus_texts_cover_training_but_not_eval(default_data):
    texts = list(corpus_texts(SMALL, seed=0))
    assert texts and all(isinstance(t, str) and t for t in texts)
    assert any("\\boxed{" in t for t in texts) and any(t.startswith("```python\n") for t in texts)
    small_eval = write_task_data(default_data["eval"].parent / "small", SMALL, seed=0)["eval"]
    eval_prompts = {row["prompt"][0]["content"] for row in read_jsonl(small_eval)}
    assert not eval_prompts & set(texts)


def test_command_line_writes_the_splits(tmp_path, capsys):
    tasks_main(["--output", str(tmp_path), "--seed", "3", "--families", "arithmetic", "--arithmetic-sft", "20",
                "--arithmetic-prompts", "5", "--eval-per-level", "2"])
    assert "sft:" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "sft.jsonl")) == 20
    assert {r["family"] for r in read_jsonl(tmp_path / "eval.jsonl")} == {"arithmetic"}


def test_select_levels_keeps_listed_levels_in_order():
    rows = [{"family": "code", "difficulty": 3, "id": 0}, {"family": "arithmetic", "difficulty": 3, "id": 1},
            {"family": "code", "difficulty": 2, "id": 2}, {"family": "arithmetic", "difficulty": 4, "id": 3}]
    kept = select_levels(rows, ("arithmetic:4", "code:3", "arithmetic:3"), "p.jsonl")
    assert [r["id"] for r in kept] == [0, 1, 3]
    assert select_levels(rows, (), "p.jsonl") == rows
    assert select_levels(rows, ("code:5",), "p.jsonl") == []
    with pytest.raises(ValueError, match="expected family:difficulty"):
        select_levels(rows, ("code",), "p.jsonl")
    with pytest.raises(ValueError, match="p.jsonl row 1: field 'difficulty' missing"):
        select_levels([rows[0], {"family": "code"}], ("code:3",), "p.jsonl")
