"""Decontamination by the Qwen2.5 report's rule (Qwen2.5 Technical Report, section 4.1: "we exclude any training
sequence s_t for which there exists an evaluation sequence s_e such that |LCS(s_t, s_e)| >= 13 and
|LCS(s_t, s_e)| >= 0.6 * min(|s_t|, |s_e|)"), over token ids, LCS being the longest common *subsequence*.

All-pairs LCS by dynamic programming is O(|s_t| |s_e|) per pair: 150k training sequences against 2k evaluation
sequences of a few hundred tokens is ~10^14 cell updates. The steps below give the same answer much faster. No
pruning step can drop a pair that meets the rule; the tests compare every decision with all-pairs DP.

1. **Bag bound, all pairs at once.** |LCS(a, b)| <= sum over tokens of min(count_a, count_b), the size of the
   multiset intersection (a common subsequence uses each token at most as often as either side has it). With
   min(x, y) = sum_{k>=1} [x >= k][y >= k], the bound for every pair is a product of two 0/1 matrices over
   "(token, k-th occurrence)" columns: sparse (training chunk) @ dense (evaluation set, frequent columns) by
   torch, plus a scatter for columns few evaluation sequences have. A training token the evaluation set lacks is
   dropped before anything else: it can be in no common subsequence (lengths for the ratio stay the original).
   A pair goes on if its bound reaches `required_lcs`, max(13, ceil(0.6 * min length)). On text-like data a few
   percent do (real English prose cut into documents and tokenized with Qwen2.5's vocabulary: 4.5%), nearly
   all a long training sequence against a short evaluation one, whose tokens mostly occur somewhere in it.
2. **Split bound, per candidate.** Restrict the evaluation sequence to the training sequence's tokens (others
   match nothing). For any split of the vocabulary into R and C, |LCS(t, e)| <= |LCS(t|R, e|R)| + bag(t|C, e|C):
   the R and C tokens of a common subsequence are common subsequences of the restrictions. With R the tokens t
   has at most a few times (`SPLIT_LEVELS`), the exact R part is short and carries the order (where the bag bound
   is loose); the C part is frequent tokens, which a long t has in nearly any order (where the bag is nearly
   tight). On the benchmark (benchmarks/decontaminate.py) 3.6% of pairs pass step 1 and 0.02% pass this step.
3. **Exact LCS** of the remaining pairs, which decides them.

Both LCS computations use the bit-parallel LCS-length algorithm (Allison and Dix 1986, in the form of Hyyro 2004,
"Bit-parallel LCS-length computation revisited": V <- 1^m; per token b_j, U = V & PM[b_j], V = (V + U) | (V - U);
LCS = zero bits of V) on Python integers, one training sequence against all its candidates at once: their match
masks are laid end to end in one integer with guard bits between them (`_segment_lcs`), so each big-integer
operation advances dozens of pairs.

Exactness holds for any data; speed depends on how much steps 1 and 2 prune, which `scan` reports.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

MIN_LCS = 13
"""Qwen2.5's absolute threshold: a common subsequence of at least 13 tokens."""
MIN_RATIO = 0.6
"""Qwen2.5's relative threshold: the common subsequence covers 60% of the shorter sequence."""

CHUNK_SIZE = 2048
"""Training sequences per bag-bound matrix product: the bound matrix is [CHUNK_SIZE, evaluation sequences]."""
DENSE_BUDGET_BYTES = 128 << 20
"""Most memory for the evaluation side of the bag bound (float32 [columns, evaluation sequences])."""
DENSE_MIN_FRACTION = 1 / 32
"""A (token, k) column goes in the dense matrix when at least this fraction of evaluation sequences has it; rarer
columns are scattered one evaluation sequence at a time (measured: the cheaper split at 2k evaluation sequences)."""
GROUP_BITS = 1 << 16
"""Most bits in one concatenated bit-parallel run: bounds the match-mask buffer at distinct tokens x 8 KB."""
GUARD_BITS = 8
"""Guard bits after each segment of a bit-parallel run, and steps between clearing them (see `_segment_lcs`)."""
SPLIT_LEVELS = (2, 8)
"""The split bound's R tokens at each pruning pass: those the training sequence has at most this many times.
On Zipf-like text, for 2k-4k-token training sequences (nearly all the work), a pass at 2 costs ~8% of the bit
operations of their full LCS and keeps 18% of the candidates; a second pass at 8 keeps 1.4% for another ~4%.
(Wall time of (2,) and (2, 8) measured within noise of each other on the shared 2-core machine.)"""


@dataclass(frozen=True)
class Match:
    """A training sequence that meets the rule against one evaluation sequence."""

    train_index: int
    """Position of the training sequence in the input."""
    eval_index: int
    """Position of the evaluation sequence in the input."""
    lcs: int
    """Length of their longest common subsequence (exact)."""
    required: int
    """The rule's threshold for this pair: max(min_lcs, ceil(min_ratio * min(train_length, eval_length)))."""
    train_length: int
    eval_length: int

    @property
    def ratio(self) -> float:
        """|LCS| / min(|s_t|, |s_e|), the report's relative measure."""
        return self.lcs / min(self.train_length, self.eval_length)


@dataclass(frozen=True)
class Scan:
    """What `scan` found and how much work each step did."""

    matches: list[Match]
    """Every (training, evaluation) pair meeting the rule, sorted by train_index then eval_index."""
    pairs: int
    """Training x evaluation pairs the rule covers."""
    candidates: int
    """Pairs whose bag bound reached the threshold (step 1): the only ones looked at again."""
    refined: int
    """Candidates whose split bound also reached it (step 2): the only ones whose full LCS was computed."""
    bound_seconds: float
    """Time in step 1, in this process."""
    exact_seconds: float
    """Time in steps 2-3, summed over workers (wall time of each: more than CPU time on a busy machine)."""

    @property
    def contaminated(self) -> list[int]:
        """Indices of training sequences to drop, ascending."""
        return sorted({m.train_index for m in self.matches})


@dataclass(frozen=True)
class DecontaminationReport:
    """How many rows `decontaminate` dropped, and why (the evaluation sequence each one matched)."""

    rows: int
    """Training rows read."""
    dropped: list[int]
    """Indices of the dropped rows, ascending."""
    matches: list[Match]
    """Every matching pair (a dropped row may match several evaluation sequences)."""

    @property
    def kept(self) -> int:
        return self.rows - len(self.dropped)

    def summary(self, eval_names: Sequence[str] | None = None, top: int = 10) -> str:
        """A few lines: rows dropped, and the evaluation sequences that caused the most drops."""
        lines = [f"decontamination: dropped {len(self.dropped)} of {self.rows} training rows "
                 f"({len(self.matches)} matching pairs)"]
        by_eval = Counter(m.eval_index for m in self.matches)
        for eval_index, count in by_eval.most_common(top):
            name = eval_names[eval_index] if eval_names is not None else f"eval #{eval_index}"
            best = max((m for m in self.matches if m.eval_index == eval_index), key=lambda m: m.ratio)
            lines.append(f"  {name}: {count} training rows, e.g. row {best.train_index} "
                         f"(LCS {best.lcs} >= {best.required}, {best.ratio:.0%} of the shorter)")
        return "\n".join(lines)


def required_lcs(train_length: int, eval_length: int, min_lcs: int = MIN_LCS, min_ratio: float = MIN_RATIO) -> int:
    """The smallest |LCS| that makes a pair contaminated: max(min_lcs, ceil(min_ratio * min(lengths))).

    `min_ratio` is read as the decimal it prints as (0.6 is 3/5 exactly): the float product can land just above an
    integer (0.55 * 100 == 55.00000000000001) and would then demand one token more.
    """
    numerator, denominator = _ratio(min_ratio)
    shorter = min(train_length, eval_length)
    return max(min_lcs, -(-numerator * shorter // denominator))


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences, bit-parallel (Hyyro 2004).

    Bit i of V stands for a[i]; PM[x] has bit i set where a[i] == x. After all of b, the zero bits of V's low
    len(a) bits count the LCS. O(len(a) * len(b) / word size).
    """
    if len(a) > len(b):
        a, b = b, a  # the shorter side as the bit vector: smaller integers
    masks: dict[int, int] = {}
    for i, token in enumerate(a):
        masks[int(token)] = masks.get(int(token), 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        match = masks.get(int(token))
        if match:
            u = v & match
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def find_contaminated(
    train: Sequence[Sequence[int]],
    evals: Sequence[Sequence[int]],
    min_lcs: int = MIN_LCS,
    min_ratio: float = MIN_RATIO,
    progress: bool = True,
    workers: int = 1,
) -> list[Match]:
    """Every (training, evaluation) pair meeting the Qwen2.5 rule; see `scan` for the arguments."""
    return scan(train, evals, min_lcs, min_ratio, progress, workers).matches


def scan(
    train: Sequence[Sequence[int]],
    evals: Sequence[Sequence[int]],
    min_lcs: int = MIN_LCS,
    min_ratio: float = MIN_RATIO,
    progress: bool = True,
    workers: int = 1,
    chunk_size: int = CHUNK_SIZE,
) -> Scan:
    """Compare every training sequence with every evaluation sequence under the Qwen2.5 rule.

    Args:
        train: token id sequences (lists, numpy arrays or 1-D tensors) to be filtered, e.g. SFT conversations.
        evals: token id sequences of the benchmarks, tokenized the same way.
        min_lcs: absolute threshold on |LCS| (>= 1).
        min_ratio: relative threshold on |LCS| / min(|s_t|, |s_e|), in [0, 1].
        progress: show a tqdm bar over training sequences.
        workers: processes for the split bound and exact LCS (Linux fork); the bag bound runs in this process,
            on torch's threads. Results do not depend on it.
        chunk_size: training sequences per bag-bound product. Results do not depend on it.

    Compare content, not chat markup: every conversation rendered with the same template shares its header
    tokens, and they count towards the LCS like any other.
    """
    if min_lcs < 1:
        raise ValueError(f"min_lcs must be >= 1, got {min_lcs}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if workers < 1 or chunk_size < 1:
        raise ValueError(f"workers and chunk_size must be >= 1, got {workers} and {chunk_size}")
    index = _EvalIndex([_as_array(e) for e in evals], min_lcs, min_ratio)
    bar = tqdm(total=len(train), unit="seq", desc="decontaminate", disable=not progress, file=sys.stderr)
    parts: list[Scan] = []

    def collect(part: Scan, rows: int) -> None:
        parts.append(part)
        bar.update(rows)

    try:
        if workers == 1:
            for chunk in _chunks(train, index, chunk_size):
                collect(_exact_task(chunk, index), len(chunk.lengths))
        else:
            # Fork: the workers inherit the index without pickling it, and run numpy and Python only (no torch
            # threads, which are not fork-safe). At most 2 chunks per worker in flight bounds the memory.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with context.Pool(workers, initializer=_set_worker_index, initargs=(index,)) as pool:
                pending: deque = deque()
                for chunk in _chunks(train, index, chunk_size):
                    pending.append((pool.apply_async(_exact_task, (chunk,)), len(chunk.lengths)))
                    while len(pending) >= 2 * workers:
                        result, rows = pending.popleft()
                        collect(result.get(), rows)
                while pending:
                    result, rows = pending.popleft()
                    collect(result.get(), rows)
    finally:
        bar.close()
    matches = sorted((m for part in parts for m in part.matches), key=lambda m: (m.train_index, m.eval_index))
    return Scan(matches, len(train) * len(evals), *(sum(getattr(part, field) for part in parts)
                                                    for field in ("candidates", "refined", "bound_seconds",
                                                                  "exact_seconds")))


def decontaminate(
    rows: Sequence[Any],
    evals: Sequence[Sequence[int]],
    tokens: Callable[[Any], Sequence[int]] = lambda row: row,
    min_lcs: int = MIN_LCS,
    min_ratio: float = MIN_RATIO,
    progress: bool = True,
    workers: int = 1,
) -> tuple[list[Any], DecontaminationReport]:
    """Drop the rows whose tokens meet the rule against some evaluation sequence; keep the others in order.

    `tokens(row)` gives a row's token ids, e.g. `lambda row: row.input_ids` for `TokenizedChat` (better: the
    content tokens only, see `scan`). Returns the kept rows and a report naming each drop's evaluation sequence.
    """
    matches = find_contaminated([tokens(row) for row in rows], evals, min_lcs, min_ratio, progress, workers)
    dropped = sorted({m.train_index for m in matches})
    drop = set(dropped)
    kept = [row for i, row in enumerate(rows) if i not in drop]
    return kept, DecontaminationReport(len(rows), dropped, matches)


# --- The evaluation side, built once ------------------------------------------------------------------------


class _EvalIndex:
    """The evaluation set as the bag bound's column matrices and as bit-parallel segments.

    Tokens are renumbered 0..U-1 over the evaluation vocabulary. Column (x, k) stands for "has token x at least
    k times", k = 1..(most times any evaluation sequence has x); col_start[x] + k - 1 numbers it.
    """

    def __init__(self, evals: list[np.ndarray], min_lcs: int, min_ratio: float):
        self.min_lcs = min_lcs
        self.numerator, self.denominator = _ratio(min_ratio)
        self.num_evals = len(evals)
        all_lengths = np.array([len(e) for e in evals], dtype=np.int64)
        # A sequence shorter than min_lcs has no common subsequence that long: it can match nothing.
        self.ids = np.flatnonzero(all_lengths >= min_lcs)  # [E] positions in the input
        self.lengths = all_lengths[self.ids]  # [E]
        self.need = self.required(self.lengths)  # [E]
        kept = [evals[i] for i in self.ids]
        flat = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        self.vocab, mapped = np.unique(flat, return_inverse=True)  # [U], [sum of lengths]
        num_tokens = max(len(self.vocab), 1)
        num_evals = len(kept)
        bounds = np.concatenate([[0], np.cumsum(self.lengths)])
        self.segments = [mapped[bounds[i]:bounds[i + 1]] for i in range(num_evals)]  # views, one per sequence

        # Counts per (sequence, token), then one matrix entry per (sequence, token, k <= count).
        doc = np.repeat(np.arange(num_evals), self.lengths)
        pair_keys, counts = np.unique(doc * num_tokens + mapped, return_counts=True)
        pair_doc, pair_token = np.divmod(pair_keys, num_tokens)
        # k - 1 at the k-th occurrence of a token in its sequence (for the split bound's bag part).
        by_token = np.argsort(doc * num_tokens + mapped, kind="stable")
        occurrence = np.empty(len(mapped), dtype=np.int64)
        occurrence[by_token] = _ragged_arange(counts)
        self.occurrences = [occurrence[bounds[i]:bounds[i + 1]] for i in range(num_evals)]
        self.max_count = np.zeros(len(self.vocab), dtype=np.int64)  # [U]
        np.maximum.at(self.max_count, pair_token, counts)
        self.col_start = np.concatenate([[0], np.cumsum(self.max_count)])  # [U + 1]
        num_columns = int(self.col_start[-1])
        entry = np.repeat(np.arange(len(pair_keys)), counts)
        entry_col = self.col_start[pair_token[entry]] + _ragged_arange(counts)
        entry_doc = pair_doc[entry]
        doc_freq = np.bincount(entry_col, minlength=num_columns)

        # Frequent columns dense ([K_dense, E] for sparse @ dense), the rest as per-column lists of sequences.
        by_freq = np.argsort(-doc_freq, kind="stable")
        budget = DENSE_BUDGET_BYTES // (4 * max(num_evals, 1))
        num_dense = int(min(budget, np.sum(doc_freq >= DENSE_MIN_FRACTION * num_evals)))
        self.dense_id = np.full(num_columns, -1, dtype=np.int64)
        # Numbered in column order, so each CSR row's dense column ids come out sorted.
        self.dense_id[np.sort(by_freq[:num_dense])] = np.arange(num_dense)
        self.dense = torch.zeros(num_dense, num_evals)  # [K_dense, E] float32: integer counts stay exact
        is_dense = self.dense_id[entry_col] >= 0
        self.dense[torch.from_numpy(self.dense_id[entry_col[is_dense]]), torch.from_numpy(entry_doc[is_dense])] = 1
        rare = ~is_dense
        order = np.argsort(entry_col[rare], kind="stable")
        self.rare_docs = entry_doc[rare][order]  # sequences having each rare column, column by column
        self.rare_start = np.concatenate([[0], np.cumsum(np.bincount(entry_col[rare], minlength=num_columns))])
        self._token_row = np.zeros(len(self.vocab), dtype=np.int64)  # scratch for `exact`, all 0 between uses

    def map_tokens(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n] whether each token is in the evaluation vocabulary, and [present] the present ones' ids."""
        position = np.searchsorted(self.vocab, tokens)
        present = position < len(self.vocab)
        present[present] = self.vocab[position[present]] == tokens[present]
        return present, position[present]

    def required(self, lengths: np.ndarray) -> np.ndarray:
        """[n] `required_lcs` as if the other sequence were the longer one: max(min_lcs, ceil(ratio * length)).

        The threshold only grows with the shorter length, so a pair's threshold is the smaller of its two
        sequences' values: min(required(n_t), required(n_e)) == required_lcs(n_t, n_e).
        """
        return np.maximum(self.min_lcs, -(-np.asarray(lengths, dtype=np.int64) * self.numerator // self.denominator))

    def bag_bound(self, row: np.ndarray, token: np.ndarray, num_rows: int) -> torch.Tensor:
        """[C, E] sum over tokens of min(count in training sequence, count in evaluation sequence).

        `row`, `token`: [n] the chunk's tokens (evaluation-vocabulary ids) and the row each belongs to.
        """
        num_evals = len(self.lengths)
        width = max(len(self.vocab), 1)
        keys = np.sort(row * width + token)
        row, token = np.divmod(keys, width)
        # k-1 for the k-th occurrence of a token in its row: position within its run of equal keys.
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        occurrence = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
        usable = occurrence < self.max_count[token]  # beyond every evaluation count: min() is already reached
        row, column = row[usable], self.col_start[token[usable]] + occurrence[usable]

        dense = self.dense_id[column]
        is_dense = dense >= 0
        # Entries are unique and sorted by (row, column), i.e. already coalesced. (torch's COO product measured
        # 2.5x faster than its CSR one here.)
        a = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([row[is_dense], dense[is_dense]])), torch.ones(int(is_dense.sum())),
            size=(num_rows, len(self.dense)), is_coalesced=True, check_invariants=False,
        )
        bound = torch.sparse.mm(a, self.dense) if len(self.dense) else torch.zeros(num_rows, num_evals)  # [C, E]
        rare_row, rare_col = row[~is_dense], column[~is_dense]
        per_entry = self.rare_start[rare_col + 1] - self.rare_start[rare_col]
        docs = self.rare_docs[np.repeat(self.rare_start[rare_col], per_entry) + _ragged_arange(per_entry)]
        flat = torch.from_numpy(np.repeat(rare_row, per_entry) * num_evals + docs)
        bound.view(-1).index_add_(0, flat, torch.ones(len(flat)))
        return bound

    def exact(self, mapped: np.ndarray, candidates: np.ndarray, need: np.ndarray) -> np.ndarray:
        """[n] |LCS| of one training sequence (mapped ids) with each candidate (positions into self.lengths),
        or -1 where a pair is shown to fall short of `need` [n] without computing its LCS.

        Every candidate is first restricted to the training sequence's tokens (the others match nothing). Then
        the split bound: for any split of the vocabulary into R and C, |LCS(t, e)| <= |LCS(t|R, e|R)| +
        bag(t|C, e|C), as the R and C tokens of a common subsequence are common subsequences of the
        restrictions. With R the tokens t has at most `level` times, the exact R part is short and carries the
        order (where the bag bound is loose); the C part is frequent tokens, which a long t has in nearly any
        order (where the bag bound is nearly tight). Each of `SPLIT_LEVELS` prunes in turn; the pairs left get
        the full LCS.
        """
        distinct, steps, counts = np.unique(mapped, return_inverse=True, return_counts=True)
        concat = np.concatenate([self.segments[i] for i in candidates])
        occurrence = np.concatenate([self.occurrences[i] for i in candidates])
        segment = np.repeat(np.arange(len(candidates)), self.lengths[candidates])  # [len(concat)]
        # rows: 1 + index in `distinct` of each position's token, 0 where t lacks it (then count 0: no match).
        self._token_row[distinct] = np.arange(1, len(distinct) + 1)
        rows = self._token_row[concat]
        self._token_row[distinct] = 0
        count = np.concatenate([[0], counts])[rows]  # how often t has each position's token
        in_bag = occurrence < count  # the k-th occurrence counts in min(count_t, count_e) iff k <= count_t
        rows -= 1

        ends = np.cumsum(self.lengths[candidates]) - 1  # [n] last position of each candidate in `concat`
        alive = np.ones(len(candidates), dtype=bool)
        for level in SPLIT_LEVELS:
            in_r = (count > 0) & (count <= level)
            bag_c = np.diff(np.cumsum(in_bag & ~in_r)[ends], prepend=0)  # per candidate, as segments are contiguous
            open_ = alive & (bag_c < need)  # the others pass this bound whatever the R part
            if not open_.any():
                continue
            pairs = np.flatnonzero(open_)
            selected = in_r & open_[segment]
            lcs_r = _segment_lcs(steps[counts[steps] <= level], rows[selected],
                                 (np.cumsum(open_) - 1)[segment[selected]], len(pairs))
            alive[pairs] = bag_c[pairs] + lcs_r >= need[pairs]

        result = np.full(len(candidates), -1, dtype=np.int64)
        if alive.any():
            keep = alive[segment] & (count > 0)
            renumber = np.cumsum(alive) - 1
            result[alive] = _segment_lcs(steps, rows[keep], renumber[segment[keep]], int(alive.sum()))
        return result


def _segment_lcs(steps: np.ndarray, tokens: np.ndarray, segment: np.ndarray, num_segments: int) -> np.ndarray:
    """[num_segments] |LCS(steps, segment s)| for each s: bit-parallel runs over segments laid end to end.

    steps: [n] one sequence, as small ints (rows of a vocabulary of at most n tokens).
    tokens, segment: [m] the other sequences concatenated, as the same small ints, and the (nondecreasing)
        segment each token belongs to; a segment with no tokens has LCS 0.

    Segment s occupies bits [start_s, start_s + len_s) followed by GUARD_BITS guard bits, at most GROUP_BITS per
    run. V - U borrows nothing (U is a subset of V), and a carry out of a segment enters its guard bits, which
    are cleared every GUARD_BITS steps: they saturate one bit per carry (G' = (G + 1) | G), at most one carry a
    step, so they never overflow into the next segment.
    """
    result = np.zeros(num_segments, dtype=np.int64)
    if not len(steps) or not len(tokens):
        return result
    lengths = np.bincount(segment, minlength=num_segments)  # [S]
    ends = np.cumsum(lengths + GUARD_BITS)  # [S] one past each segment's guard bits, in one layout for all runs
    first = 0
    while first < num_segments:
        base = ends[first - 1] if first else 0
        last = max(int(np.searchsorted(ends, base + GROUP_BITS, side="right")), first + 1)
        lo, hi = np.searchsorted(segment, [first, last])  # this run's tokens
        if lo == hi:  # only empty segments
            first = last
            continue
        bits = np.arange(lo, hi) + GUARD_BITS * segment[lo:hi] - (lo + GUARD_BITS * first)  # [hi - lo]
        run = _run_bit_parallel(steps, tokens[lo:hi], bits, int(ends[last - 1] - base))
        result[first:last] = np.bincount(segment[lo:hi] - first, weights=run, minlength=last - first)
        first = last
    return result


def _run_bit_parallel(steps: np.ndarray, tokens: np.ndarray, bits: np.ndarray, total_bits: int) -> np.ndarray:
    """[m] for each of the run's token positions, 1 if it is outside the final LCS "zero" set, i.e. 1 - V bit.

    Summed per segment that is the segment's LCS (Hyyro 2004: LCS = zero bits of V over the segment).
    """
    num_bytes = (total_bits + 7) // 8
    vocab = int(max(steps.max(), tokens.max())) + 1
    present = np.zeros(vocab, dtype=bool)
    present[tokens] = True
    compact = np.cumsum(present) - 1  # [vocab] row in `masks` of each token present in the run
    masks = np.zeros(int(present.sum()) * num_bytes, dtype=np.uint8)  # PM[x] as little-endian bytes, row by row
    np.bitwise_or.at(masks, compact[tokens] * num_bytes + (bits >> 3), (1 << (bits & 7)).astype(np.uint8))
    pm = [int.from_bytes(row, "little") for row in masks.reshape(-1, num_bytes)]
    matches = [pm[i] for i in compact[steps[present[steps]]].tolist()]  # a token with no match leaves V as is
    keep_bits = np.zeros(num_bytes * 8, dtype=bool)
    keep_bits[bits] = True
    keep = int.from_bytes(np.packbits(keep_bits, bitorder="little").tobytes(), "little")
    v = keep
    for block in range(0, len(matches), GUARD_BITS):
        for match in matches[block:block + GUARD_BITS]:
            u = v & match
            v = (v + u) | (v ^ u)  # v ^ u == v - u, as u is a subset of v
        v &= keep  # clear the guard bits
    final = np.unpackbits(np.frombuffer(v.to_bytes(num_bytes, "little"), dtype=np.uint8), bitorder="little")
    return 1 - final[bits].astype(np.int64)


# --- Chunks of training sequences ---------------------------------------------------------------------------


@dataclass
class _Chunk:
    start: int
    """Index of the chunk's first training sequence."""
    lengths: np.ndarray  # [C] original lengths
    mapped: list[np.ndarray]  # [C] sequences in evaluation-vocabulary ids
    rows: np.ndarray  # [n] candidate pairs: row within the chunk
    evals: np.ndarray  # [n] candidate pairs: position into the index's kept evaluation sequences
    required: np.ndarray  # [n] the rule's threshold per candidate pair
    bound_seconds: float


def _chunks(train: Sequence[Sequence[int]], index: _EvalIndex, chunk_size: int) -> Iterator[_Chunk]:
    """Steps 1-2 chunk by chunk, in this process: the candidate pairs each chunk sends to step 3."""
    for start in range(0, len(train), chunk_size):
        began = time.perf_counter()
        sequences = [_as_array(s) for s in train[start:start + chunk_size]]
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)  # [C]
        present, token = index.map_tokens(np.concatenate(sequences) if sequences else np.zeros(0, np.int64))
        row = np.repeat(np.arange(len(sequences)), lengths)[present]  # [n] row of each kept token
        mapped = np.split(token, np.cumsum(np.bincount(row, minlength=len(sequences)))[:-1])
        if len(index.lengths) and len(token):
            train_need = index.required(lengths)  # [C]
            threshold = torch.minimum(torch.from_numpy(train_need)[:, None], torch.from_numpy(index.need)[None])
            bound = index.bag_bound(row, token, len(sequences))  # [C, E]
            rows, evals = (t.numpy() for t in torch.nonzero(bound >= threshold, as_tuple=True))
            need = np.minimum(train_need[rows], index.need[evals])
        else:
            rows = evals = need = np.zeros(0, dtype=np.int64)
        yield _Chunk(start, lengths, mapped, rows, evals, need, time.perf_counter() - began)


def _exact_task(chunk: _Chunk, index: _EvalIndex | None = None) -> Scan:
    """Steps 2-3 for one chunk: the candidate pairs meeting the rule, as the chunk's part of the `Scan`."""
    index = index if index is not None else _WORKER_INDEX
    began = time.perf_counter()
    matches, refined = [], 0
    splits = np.flatnonzero(np.diff(chunk.rows)) + 1
    for rows, evals, need in zip(*(np.split(a, splits) for a in (chunk.rows, chunk.evals, chunk.required)),
                                 strict=True):
        if not len(rows):
            continue
        row = int(rows[0])
        lcs = index.exact(chunk.mapped[row], evals, need)  # -1: pruned by the split bound
        refined += int(np.sum(lcs >= 0))
        hit = lcs >= need
        for e, length, threshold in zip(evals[hit], lcs[hit], need[hit], strict=True):
            matches.append(Match(chunk.start + row, int(index.ids[e]), int(length), int(threshold),
                                 int(chunk.lengths[row]), int(index.lengths[e])))
    return Scan(matches, len(chunk.lengths) * index.num_evals, len(chunk.rows), refined, chunk.bound_seconds,
                time.perf_counter() - began)


_WORKER_INDEX: _EvalIndex | None = None


def _set_worker_index(index: _EvalIndex) -> None:
    global _WORKER_INDEX
    _WORKER_INDEX = index


# --- Helpers ------------------------------------------------------------------------------------------------


def _as_array(sequence: Sequence[int]) -> np.ndarray:
    if isinstance(sequence, torch.Tensor):
        sequence = sequence.numpy()
    array = np.asarray(sequence, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"a token sequence must be 1-D, got shape {array.shape}")
    return array


def _ratio(min_ratio: float) -> tuple[int, int]:
    """min_ratio as an exact fraction of the decimal it prints as (repr(0.6) == '0.6' -> 3/5)."""
    fraction = Fraction(repr(float(min_ratio)))
    return fraction.numerator, fraction.denominator


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[sum(counts)] 0..c-1 for each c in counts, concatenated."""
    counts = np.asarray(counts, dtype=np.int64)
    if not len(counts):
        return np.zeros(0, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)

