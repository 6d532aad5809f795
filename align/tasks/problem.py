"""The `Problem` record shared by every task family, and answer parsing."""

import hashlib
from dataclasses import dataclass

BOXED = "\\boxed{"


@dataclass(frozen=True)
class Problem:
    """One synthetic problem with everything needed to train on it and to check an answer."""

    family: str
    """Task family, e.g. "arithmetic" or "code"."""
    difficulty: int
    """Difficulty level, 1 = easiest."""
    prompt: str
    """The user message."""
    solution: str
    """The reference assistant message (worked solution, or a fenced code block)."""
    answer: str
    """What a verifier compares against: the final integer, or the reference code without fences."""
    tests: tuple[str, ...] = ()
    """Assert statements calling `entry_point` (code family only)."""
    entry_point: str = ""
    """Name of the function the code must define (code family only)."""

    @property
    def key(self) -> str:
        """Normalized problem text: two problems with the same key are the same problem."""
        return normalize_problem_text(self.prompt)

    @property
    def id(self) -> str:
        """Stable id derived from the problem text, the same for every seed."""
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:12]
        return f"{self.family}-{self.difficulty}-{digest}"


def normalize_problem_text(text: str) -> str:
    """Lower-cases and collapses whitespace, so formatting changes do not make a new problem."""
    return " ".join(text.lower().split())


def extract_boxed_answer(text: str) -> str | None:
    """Returns the stripped content of the last complete `\\boxed{...}` in `text`, or None.

    Braces inside the box are matched, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. An unclosed last
    box is skipped in favour of the last complete one.
    """
    found = None
    start = text.find(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[start + len(BOXED) : i - 1].strip()
        start = text.find(BOXED, start + 1)
    return found
