"""Decontamination by the Qwen2.5 rule: the bit-parallel LCS against the textbook DP table, the threshold at its
edges, and every decision of the pruned scan against all-pairs DP (so no pruning step ever drops a match)."""

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch

from align.data import decontaminate as dc
from align.data.decontaminate import (
    Match,
    decontaminate,
    find_contaminated,
    lcs_length,
    required_lcs,
    scan,
)


def dp_lcs(a, b) -> int:
    """Textbook O(len(a) len(b)) table: L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j] else max(L[i-1][j], L[i][j-1])."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def all_pairs(train, evals, min_lcs=13, min_ratio=0.6) -> list[tuple[int, int, int]]:
    """The rule as written, every pair by DP: (train, eval, |LCS|) where |LCS| >= min_lcs and
    |LCS| >= min_ratio * min(lengths) (min_ratio as the decimal it prints as)."""
    found = []
    for i, t in enumerate(train):
        for j, e in enumerate(evals):
            lcs = dp_lcs(t, e)
            if lcs >= min_lcs and lcs >= Fraction(repr(min_ratio)) * min(len(t), len(e)):
                found.append((i, j, lcs))
    return found


def as_tuples(matches: list[Match]) -> list[tuple[int, int, int]]:
    return [(m.train_index, m.eval_index, m.lcs) for m in matches]


def random_sequences(rng, count, low, high, vocab):
    return [rng.integers(0, vocab, int(rng.integers(low, high + 1))).tolist() for _ in range(count)]


def zipf_sequences(rng, count, low, high, vocab, exponent=1.15):
    """Text-like tokens: rank r drawn with probability proportional to 1 / (r + 2.7) ** exponent."""
    p = 1 / (np.arange(1, vocab + 1) + 2.7) ** exponent
    cdf = np.cumsum(p / p.sum())
    return [np.searchsorted(cdf, rng.random(int(rng.integers(low, high + 1)))).tolist() for _ in range(count)]


# --- LCS ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, expected", [
    ("ABCBDAB", "BDCABA", 4),  # CLRS 15.4: "BCBA" (also "BDAB", "BCAB"); no common subsequence of 5
    ("AGGTAB", "GXTXAYB", 4),  # "GTAB": G, T, A, B appear in this order in both
    ("ABCDEFGHIJ", "JIHGFEDCBA", 1),  # reversed: any two tokens come in opposite orders
    ("AAAA", "AA", 2),  # a token is used at most as often as the rarer side has it
    ("ABC", "XYZ", 0),
    ("", "ABC", 0),
    ("A" * 70 + "B", "B" + "A" * 70, 70),  # crosses a 64-bit word: all A's, or B alone
])
def test_lcs_hand_values(a, b, expected):
    a, b = [ord(c) for c in a], [ord(c) for c in b]
    assert lcs_length(a, b) == expected == dp_lcs(a, b)
    assert lcs_length(b, a) == expected


def test_lcs_equals_dp_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(300):
        vocab = int(rng.integers(1, 40))
        a, b = (rng.integers(0, vocab, int(rng.integers(0, 140))).tolist() for _ in range(2))
        assert lcs_length(a, b) == dp_lcs(a, b)


@pytest.mark.parametrize("guard_bits, group_bits", [(8, 1 << 16), (1, 1 << 16), (8, 64), (3, 1)])
def test_segment_lcs_equals_dp_per_segment(monkeypatch, guard_bits, group_bits):
    """Many sequences in one integer (and, with small group_bits, split across runs): each segment's LCS as if
    alone. Small alphabets and long step sequences make carries out of segment tops frequent, so guard bits
    saturating between clears (guard_bits steps apart) would show up as wrong counts in the next segment."""
    monkeypatch.setattr(dc, "GUARD_BITS", guard_bits)
    monkeypatch.setattr(dc, "GROUP_BITS", group_bits)
    rng = np.random.default_rng(1)
    for _ in range(6):
        vocab = int(rng.integers(2, 6))
        steps = rng.integers(0, vocab, int(rng.integers(1, 300)))
        lengths = rng.choice([0, 1, 2, 31, 63, 64, 65, 100], size=int(rng.integers(1, 12)))
        segments = [rng.integers(0, vocab, n) for n in lengths]
        tokens = np.concatenate(segments)
        segment = np.repeat(np.arange(len(segments)), lengths)
        got = dc._segment_lcs(steps, tokens, segment, len(segments))
        assert got.tolist() == [dp_lcs(steps.tolist(), s.tolist()) for s in segments]


# --- The threshold ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_length, eval_length, expected", [
    (20, 500, 13),  # 0.6 * 20 = 12 < 13: the absolute threshold decides
    (21, 500, 13),  # 12.6 -> 13
    (22, 500, 14),  # 13.2 -> 14: the relative threshold takes over
    (25, 25, 15),  # exactly 0.6 * 25
    (300, 30, 18),  # the shorter side counts, whichever it is
    (5, 5, 13),  # a 5-token pair can never reach 13
])
def test_required_lcs(train_length, eval_length, expected):
    assert required_lcs(train_length, eval_length) == expected


def test_required_lcs_reads_the_ratio_as_a_decimal():
    assert 0.55 * 100 > 55  # the float product is 55.00000000000001
    assert required_lcs(100, 100, min_lcs=1, min_ratio=0.55) == 55


def planted(shared: list[int], train_filler: int, eval_filler: int) -> tuple[list[int], list[int]]:
    """A pair whose LCS is exactly `shared`: fillers are tokens only one side has."""
    return shared + list(range(1000, 1000 + train_filler)), list(range(2000, 2000 + eval_filler)) + shared


@pytest.mark.parametrize("shared, train_filler, eval_filler, is_match", [
    (13, 7, 30, True),  # |LCS| = 13, min length 20: 13 >= 13 and 13 >= 12
    (12, 8, 30, False),  # |LCS| = 12 < 13
    (15, 10, 30, True),  # min length 25: 15 >= 0.6 * 25 exactly
    (14, 11, 30, False),  # min length 25: 14 < 15
    (18, 30, 12, True),  # min length 30 is the evaluation sequence: 18 = 0.6 * 30
    (17, 30, 13, False),
])
def test_threshold_edges(shared, train_filler, eval_filler, is_match):
    train, evals = planted(list(range(1, shared + 1)), train_filler, eval_filler)
    assert lcs_length(train, evals) == shared
    matches = find_contaminated([train], [evals], progress=False)
    if is_match:
        assert matches == [Match(0, 0, shared, required_lcs(len(train), len(evals)), len(train), len(evals))]
    else:
        assert matches == []


def test_order_matters_beyond_the_bag_bound():
    """Same tokens, one swapped pair: the bag bound (15) passes the threshold 15, the LCS (14) does not."""
    shared = list(range(1, 16))
    train, evals = planted(shared, 10, 30)
    swapped = shared[:7] + [shared[8], shared[7]] + shared[9:]
    assert lcs_length(swapped, shared) == 14
    assert find_contaminated([train], [list(range(2000, 2030)) + swapped], progress=False) == []
    assert len(find_contaminated([train], [evals], progress=False)) == 1


# --- The scan against all pairs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, vocab, min_lcs, min_ratio, dense_fraction", [
    (0, 6, 13, 0.6, 1 / 32),  # Qwen2.5's rule on a small alphabet: many pairs near the threshold
    (1, 12, 13, 0.6, 0.0),  # every (token, k) column dense
    (2, 12, 13, 0.6, 2.0),  # no dense column: the scatter alone
    (3, 4, 5, 0.3, 1 / 32),  # a looser rule: most pairs are candidates
    (4, 30, 3, 0.8, 1 / 32),
])
def test_scan_equals_all_pairs_dp(monkeypatch, seed, vocab, min_lcs, min_ratio, dense_fraction):
    monkeypatch.setattr(dc, "DENSE_MIN_FRACTION", dense_fraction)
    rng = np.random.default_rng(seed)
    train = random_sequences(rng, 40, 0, 45, vocab) + [[0] * 40, [1] * 3]  # repeats: high (token, k) columns
    evals = random_sequences(rng, 15, 0, 45, vocab) + [[0] * 25, []]
    result = scan(train, evals, min_lcs, min_ratio, progress=False, chunk_size=16)
    expected = all_pairs(train, evals, min_lcs, min_ratio)
    assert as_tuples(result.matches) == expected
    # The data exercise every step: some pairs pruned by each bound, some decided by the exact LCS.
    assert expected and result.candidates < result.pairs and result.refined <= result.candidates
    for m in result.matches:
        assert (m.train_length, m.eval_length) == (len(train[m.train_index]), len(evals[m.eval_index]))
        assert m.required == required_lcs(m.train_length, m.eval_length, min_lcs, min_ratio) <= m.lcs


def test_split_bound_prunes_and_never_drops_a_match():
    """Long text-like training sequences against short evaluation ones, the case the bag bound is loose for."""
    rng = np.random.default_rng(5)
    train = zipf_sequences(rng, 12, 150, 300, 300)
    evals = zipf_sequences(rng, 25, 20, 40, 300)
    result = scan(train, evals, progress=False)
    assert as_tuples(result.matches) == all_pairs(train, evals)
    assert result.matches and result.refined < result.candidates  # the split bound decided pairs alone


def test_bag_bound_is_the_multiset_intersection(monkeypatch):
    rng = np.random.default_rng(6)
    for dense_fraction in (0.0, 1 / 4, 2.0):
        monkeypatch.setattr(dc, "DENSE_MIN_FRACTION", dense_fraction)
        evals = [np.array(e) for e in random_sequences(rng, 10, 13, 60, 8)]
        train = [np.array(t) for t in random_sequences(rng, 7, 0, 80, 12)]
        index = dc._EvalIndex(evals, 13, 0.6)
        present, token = index.map_tokens(np.concatenate(train))
        row = np.repeat(np.arange(len(train)), [len(t) for t in train])[present]
        bound = index.bag_bound(row, token, len(train))
        expected = [[sum((Counter(t.tolist()) & Counter(e.tolist())).values()) for e in evals] for t in train]
        assert bound.tolist() == expected


def test_realistic_data_with_planted_copies():
    """Zipf-distributed tokens at realistic lengths, a few evaluation sequences planted in training ones with
    edits: all planted pairs found, and every decision equal to the bit-parallel LCS over all pairs."""
    rng = np.random.default_rng(7)
    evals = zipf_sequences(rng, 20, 60, 300, 5000)
    train = zipf_sequences(rng, 150, 16, 600, 5000)
    text = lambda n: zipf_sequences(rng, 1, n, n, 5000)[0]  # noqa: E731
    for t, e in [(3, 0), (50, 7), (99, 19)]:  # the eval sequence with 20% of its tokens replaced, inside noise
        copy = [x if rng.random() > 0.2 else int(rng.integers(5000, 6000)) for x in evals[e]]
        train[t] = text(40) + copy + text(40)
    result = scan(train, evals, progress=False)
    expected = [(i, j, lcs_length(t, e)) for i, t in enumerate(train) for j, e in enumerate(evals)]
    expected = [(i, j, n) for i, j, n in expected if n >= required_lcs(len(train[i]), len(evals[j]))]
    assert as_tuples(result.matches) == expected
    assert {(3, 0), (50, 7), (99, 19)} <= {(i, j) for i, j, _ in expected}
    assert result.candidates < result.pairs / 4


def test_split_invariance_chunks_and_workers():
    rng = np.random.default_rng(8)
    train = random_sequences(rng, 60, 0, 50, 7)
    evals = random_sequences(rng, 12, 0, 50, 7)
    whole = scan(train, evals, progress=False)
    assert whole.matches
    for chunk_size in (1, 7, 1000):
        assert scan(train, evals, progress=False, chunk_size=chunk_size).matches == whole.matches
    assert scan(train, evals, progress=False, chunk_size=9, workers=2).matches == whole.matches
    # Two halves of the training set (as two ranks would scan them) find the same pairs as the whole.
    first, second = scan(train[:25], evals, progress=False), scan(train[25:], evals, progress=False)
    halves = as_tuples(first.matches) + [(i + 25, j, n) for i, j, n in as_tuples(second.matches)]
    assert halves == as_tuples(whole.matches)
    assert first.candidates + second.candidates == whole.candidates


# --- Inputs and the convenience ---------------------------------------------------------------------------------


def test_inputs_of_any_sequence_type_and_edge_cases():
    shared = list(range(1, 21))
    train = [torch.tensor(shared), np.array(shared[::-1]), [], [99] * 30]
    evals = [shared, [], [5] * 12]
    matches = find_contaminated(train, evals, progress=False)
    assert as_tuples(matches) == [(0, 0, 20)]  # reversed: LCS 1; empty and unshared: nothing
    assert find_contaminated(train, [], progress=False) == []
    assert find_contaminated([], evals, progress=False) == []
    with pytest.raises(ValueError, match="min_ratio"):
        find_contaminated(train, evals, min_ratio=1.5)
    with pytest.raises(ValueError, match="min_lcs"):
        find_contaminated(train, evals, min_lcs=0)
    with pytest.raises(ValueError, match="1-D"):
        find_contaminated([[[1, 2]]], evals)


def test_decontaminate_drops_matching_rows_and_reports_why():
    shared = list(range(1, 21))
    rows = [{"id": "a", "ids": shared + [500] * 5}, {"id": "b", "ids": [7, 8, 9]}, {"id": "c", "ids": shared[:15]}]
    evals = [list(range(300, 310)) + shared, list(range(1, 14))]
    kept, report = decontaminate(rows, evals, tokens=lambda row: row["ids"], progress=False)
    assert [row["id"] for row in kept] == ["b"]
    assert (report.rows, report.kept, report.dropped) == (3, 1, [0, 2])
    assert as_tuples(report.matches) == [(0, 0, 20), (0, 1, 13), (2, 0, 15), (2, 1, 13)]
    summary = report.summary(eval_names=["gsm8k/0", "math/1"])
    assert summary.startswith("decontamination: dropped 2 of 3 training rows (4 matching pairs)")
    assert "gsm8k/0: 2 training rows" in summary
