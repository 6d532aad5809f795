"""Rule-based checks of the synthetic tasks' answers: arithmetic answer matching and running code against tests.

The code check runs model-written code in a child process with CPU-time, memory, file-size and wall-clock
limits, an empty environment and a fresh temporary directory. That contains accidents (loops, memory blow-ups);
it is not yet a security sandbox against hostile code (no network or filesystem isolation): issue #4 builds that.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from align.tasks import extract_boxed_answer

_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


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


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (5, 5))
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def check_code(response: str, tests: list[str], timeout: float = 10.0) -> Verdict:
    """Passes when the response's Python block defines code for which every test assertion holds."""
    code = extract_code(response)
    if code is None:
        return Verdict(False, "no ```python block")
    # A sentinel printed only after every assertion ran: exit code 0 alone could be faked with sys.exit(0).
    sentinel = "ALL-TESTS-PASSED-" + os.urandom(8).hex()
    program = code + "\n\n" + "\n".join(tests) + f"\nprint({sentinel!r})\n"
    with tempfile.TemporaryDirectory() as workdir:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", program], cwd=workdir, env={}, capture_output=True, timeout=timeout,
                preexec_fn=_limit_child, check=False,
            )
        except subprocess.TimeoutExpired:
            return Verdict(False, f"timed out after {timeout}s")
    if proc.returncode == 0 and sentinel.encode() in proc.stdout[-4096:]:
        return Verdict(True, "all tests passed")
    last_error = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return Verdict(False, last_error[0][:200])


def check_task(row: dict, response: str) -> Verdict:
    """Check a response to a prompt/eval row of the synthetic tasks (see align.tasks)."""
    if row["family"] == "arithmetic":
        return check_arithmetic(response, row["answer"])
    if row["family"] == "code":
        return check_code(response, row["tests"])
    raise ValueError(f"no verifier for task family {row['family']!r}")
