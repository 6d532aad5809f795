"""Rule-based checks of the synthetic tasks' answers: arithmetic answer matching and running code against tests.

The code check runs model-written code in the sandbox of `reward.sandbox` (namespaces, a private read-only root,
an unprivileged uid, rlimits; see there for what is and is not blocked) and decides the verdict outside it, so
that hostile code cannot fake a pass:
  * When every test has the form `assert CALL == EXPECTED` with EXPECTED a literal of plain JSON data (the
    synthetic tasks' tests, e.g. `assert f(2, -3) == 7`), only the CALL expressions enter the sandbox. A harness
    there runs the code, evaluates each call and prints the values as JSON, refusing anything whose type is not
    exactly int, float, str, bool, None, list or dict (so an object whose `__eq__` always returns True is
    refused). The parent parses that JSON and compares it with `ast.literal_eval(EXPECTED)`, types included
    (True is not 1). The expected values never enter the sandbox, so nothing in it (its own code object,
    /proc/self/cmdline, patched builtins, a forged report, an early `os._exit(0)`) can reveal or fake them: the
    only way to pass is to print the right values.
  * Tests of any other form run as asserts inside the sandbox, and the harness reports which passed. That mode
    trusts the process: code that knows this module can forge the report (weaker; exits before the report,
    exceptions and failed asserts are still caught).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from align.tasks import extract_boxed_answer
from reward.sandbox import SandboxLimits, SandboxResult, run_untrusted

_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    """A verifier's decision on one response."""

    passed: bool
    """True when the response is correct."""
    reason: str
    """Why, in a few words ("test 2: got 5, expected 7", "timed out after 10s", ...)."""


def check_arithmetic(response: str, answer: str) -> Verdict:
    """Passes when the last \\boxed{...} in the response holds the reference integer."""
    boxed = extract_boxed_answer(response)
    if boxed is None:
        return Verdict(False, "no \\boxed{} answer")
    try:
        return Verdict(int(boxed.replace(",", "").strip()) == int(answer), f"boxed {boxed!r}, expected {answer}")
    except ValueError:
        return Verdict(False, f"boxed {boxed!r} is not an integer")


def extract_code(response: str) -> str | None:
    """The first fenced Python block of a response, or None."""
    match = _CODE_BLOCK.search(response)
    return match.group(1) if match else None


_RESULTS_MARKER = "@@qwen-align-test-results@@"
# Runs in the sandbox after the line `_SOLUTION, _MODE, _TESTS, _MARKER = ...`. Whatever the solution does to it
# (patching builtins, json or stdout, exiting early) can only make the check fail: the verdict is decided outside.
_HARNESS = """
import _json, sys as _sys


def _error_text(error):
    if isinstance(error, SyntaxError):
        return "SyntaxError: %s (line %s)" % (error.msg, error.lineno)
    return ("%s: %s" % (type(error).__name__, error)).rstrip(": ")[:300]


def _plain(value, depth=0):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list and depth < 100:
        return [_plain(item, depth + 1) for item in value]
    if kind is dict and depth < 100 and all(type(key) is str for key in value):
        return {key: _plain(item, depth + 1) for key, item in value.items()}
    raise TypeError("returned %s, which is not plain JSON data" % kind.__name__)


def _outcome(number, text):
    try:
        if _MODE == "calls":
            return {"value": _plain(eval(compile(text, "<test %d>" % number, "eval"), _namespace))}
        exec(compile(text, "<test %d>" % number, "exec"), _namespace)
        return {"passed": True}
    except AssertionError:
        return {"error": "assertion failed"}
    except BaseException as error:
        return {"error": _error_text(error)}


def _dumps(value):
    # json.dumps of _plain data, by hand: importing json (and the re and enum modules it pulls in) would cost
    # ~20 ms, a third of a sandboxed run. _json is its C string escaper.
    kind = type(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("Out of range float values are not JSON compliant")
        return float.__repr__(value)
    if kind is str:
        return _json.encode_basestring_ascii(value)
    if kind is list:
        return "[" + ", ".join([_dumps(item) for item in value]) + "]"
    if kind is dict:
        return "{" + ", ".join([_json.encode_basestring_ascii(key) + ": " + _dumps(item)
                                for key, item in value.items()]) + "}"
    raise TypeError("Object of type %s is not JSON serializable" % kind.__name__)


def _encoded(outcome):
    try:
        return _dumps(outcome)
    except (ValueError, TypeError, RecursionError) as error:
        return _dumps({"error": _error_text(error)})


_namespace = {"__name__": "__solution__", "__builtins__": __builtins__}
try:
    exec(compile(_SOLUTION, "<solution>", "exec"), _namespace)
except BaseException as error:
    _sys.stderr.write(_error_text(error) + "\\n")
    _sys.exit(1)
_outcomes = [_encoded(_outcome(number, text)) for number, text in enumerate(_TESTS, 1)]
_sys.stdout.flush()
print("\\n" + _MARKER + "[" + ",".join(_outcomes) + "]", flush=True)
"""


def _is_plain(value: object) -> bool:
    """Whether a value is JSON data of exactly the types the harness may report."""
    if value is None or type(value) in (bool, int, float, str):
        return not (type(value) is float and not math.isfinite(value))
    if type(value) is list:
        return all(_is_plain(item) for item in value)
    return type(value) is dict and all(type(k) is str and _is_plain(v) for k, v in value.items())


def _same_plain(got: object, expected: object) -> bool:
    """Equality that also requires equal types at every level: True is not 1, 2 is not 2.0."""
    if type(got) is not type(expected):
        return False
    if type(got) is list:
        return len(got) == len(expected) and all(_same_plain(g, e) for g, e in zip(got, expected, strict=True))
    if type(got) is dict:
        return got.keys() == expected.keys() and all(_same_plain(got[k], expected[k]) for k in got)
    return got == expected


def split_call_test(test: str) -> tuple[str, object] | None:
    """(CALL, expected value) for a test `assert CALL == EXPECTED` whose EXPECTED is a plain JSON literal, else None."""
    try:
        statements = ast.parse(test).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if len(statements) != 1 or not isinstance(statements[0], ast.Assert):
        return None
    check = statements[0].test
    if not (isinstance(check, ast.Compare) and len(check.ops) == 1 and isinstance(check.ops[0], ast.Eq)):
        return None
    try:
        expected = ast.literal_eval(check.comparators[0])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    call = ast.get_source_segment(test, check.left)
    return (call, expected) if call and _is_plain(expected) else None


def _harness_program(code: str, mode: str, tests: list[str]) -> str:
    return f"_SOLUTION, _MODE, _TESTS, _MARKER = {(code, mode, tests, _RESULTS_MARKER)!r}\n{_HARNESS}"


def _reported_outcomes(stdout: str, n_tests: int) -> list[dict] | None:
    """The outcomes the harness printed last, if well formed: one {"value"}, {"passed": true} or {"error"} per test."""
    lines = [line for line in stdout.splitlines() if line.startswith(_RESULTS_MARKER)]
    if not lines:
        return None
    try:
        outcomes = json.loads(lines[-1][len(_RESULTS_MARKER):], parse_constant=_refuse)
    except (ValueError, RecursionError):
        return None
    well_formed = type(outcomes) is list and len(outcomes) == n_tests and all(
        type(o) is dict and len(o) == 1 and ("value" in o or o.get("passed") is True or type(o.get("error")) is str)
        for o in outcomes)
    return outcomes if well_formed else None


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not plain JSON data")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _verdict(result: SandboxResult, outcomes: list[dict] | None, expected: list[object] | None) -> Verdict:
    """Pass only when the harness reported every test passing, judged here: by the expected values (`expected`,
    calls mode) or by the reported asserts (`expected` None), and the program then exited cleanly."""
    if outcomes is None:
        return Verdict(False, result.reason if not result.ok else "exited before reporting test results")
    for number, outcome in enumerate(outcomes, 1):
        if "error" in outcome:
            return Verdict(False, f"test {number}: {outcome['error'][:200]}")
        if expected is not None and not ("value" in outcome and _same_plain(outcome["value"], expected[number - 1])):
            got = _short(outcome.get("value"))
            return Verdict(False, f"test {number}: got {got}, expected {_short(expected[number - 1])}")
        if expected is None and outcome.get("passed") is not True:
            return Verdict(False, f"test {number}: no assert outcome")
    if not result.ok:
        return Verdict(False, result.reason)
    return Verdict(True, f"all {len(outcomes)} tests passed")


def check_code(response: str, tests: list[str], timeout: float = 10.0) -> Verdict:
    """Passes when the response's Python block defines code for which every test assertion holds."""
    code = extract_code(response)
    if code is None:
        return Verdict(False, "no ```python block")
    calls = [split_call_test(test) for test in tests]
    limits = SandboxLimits(wall_seconds=timeout, cpu_seconds=max(1, min(5, math.ceil(timeout))))
    if all(calls):  # the expected values stay here; only the calls enter the sandbox
        result = run_untrusted(_harness_program(code, "calls", [call for call, _ in calls]), limits=limits)
        return _verdict(result, _reported_outcomes(result.stdout, len(tests)), [value for _, value in calls])
    result = run_untrusted(_harness_program(code, "asserts", list(tests)), limits=limits)
    return _verdict(result, _reported_outcomes(result.stdout, len(tests)), None)


def first_occurrences(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """(positions of each distinct key's first occurrence, for every position the index of its key among them).
    Example: keys [a, b, a] -> ([0, 1], [0, 1, 0])."""
    index_of: dict[Hashable, int] = {}
    firsts, inverse = [], []
    for position, key in enumerate(keys):
        if key not in index_of:
            index_of[key] = len(firsts)
            firsts.append(position)
        inverse.append(index_of[key])
    return firsts, inverse


def check_task(row: dict, response: str) -> Verdict:
    """Check a response to a prompt/eval row of the synthetic tasks (see align.tasks)."""
    if row["family"] == "arithmetic":
        return check_arithmetic(response, row["answer"])
    if row["family"] == "code":
        return check_code(response, row["tests"])
    raise ValueError(f"no verifier for task family {row['family']!r}")
