"""Which GRPO queries to roll out next: ordered by the variance of their sampled responses' rewards.

    scheduler = QueryScheduler(num_queries=len(prompts), config=SchedulerConfig(order="variance"))
    batch = scheduler.collect(batch_size=32, rollout=lambda ids: roll_out_and_score(ids))  # -> ScheduledBatch
    batch.query_ids, batch.payloads, batch.rewards  # kept groups; batch.dropped_ids: zero-variance groups dropped
    checkpoint["scheduler"] = scheduler.state_dict()

The Qwen2.5 report (section 4, online RL): "the order in which queries are processed is determined by the variance
of their response scores, as evaluated by the reward model ... queries with higher variance in response scores are
prioritized". A group whose G rewards are all equal has zero GRPO advantage (DeepSeekMath eq. 3 normalises within
the group), so it carries no gradient; high-variance queries are where the policy can still learn.

What the report leaves open, and what we chose:
- The estimate. Each query keeps one number, the unbiased sample variance (divisor G - 1, as `group_advantages`'
  std) of the rewards of its latest group, or an exponential moving average over its groups (`update`). It comes
  from an optional scoring pass at start (`seed_estimates`) or from the query's first visit; until then the query
  has `unvisited_priority` (default +inf, so every query is visited once before any is revisited).
- When a query comes back (`revisit`). "epoch" (default): a pass over the queries visits each once, always taking
  the highest-priority queries not yet visited in this pass, and a new pass starts when all are visited. This is
  the report's "order" read literally, and no query starves. "batch": every batch takes the top queries of the
  whole pool (without replacement within the batch only), so the same high-variance queries return batch after
  batch and low-variance ones may never come back (prioritised replay rather than an ordering).
- Zero-variance groups (`zero_variance`): "skip" drops the group from the training batch (the batch shrinks);
  "resample" drops it and rolls out replacement queries, next by priority, until the batch is full or
  `max_resample_factor * batch_size` replacements were drawn (DAPO's dynamic sampling, Yu et al. 2025, sec. 3.2);
  "deprioritize" keeps it in the batch (zero advantage, but its tokens still count in a token-level loss
  normaliser) and ranks the query below every other query until all the others have been visited since.
- Ties (all unvisited queries at +inf, equal estimates) are broken by a random permutation drawn from (seed,
  epoch) in epoch mode or (seed, draw count) in batch mode: deterministic, and the same after a resume.
- `order="uniform"`: a seeded random permutation per epoch, for comparison with the variance order.

Pure Python and torch: no Ray, no vLLM. The state is a dict of plain lists (`state_dict`), JSON-serialisable.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import torch

Payload = TypeVar("Payload")


# ---- variants, chosen by name in SchedulerConfig --------------------------------------------------------------


def replace_with_latest(old: torch.Tensor, observed: torch.Tensor, decay: float) -> torch.Tensor:
    """The estimate is the variance of the latest group alone."""
    return observed


def exponential_moving_average(old: torch.Tensor, observed: torch.Tensor, decay: float) -> torch.Tensor:
    """estimate = decay * old + (1 - decay) * observed (the first observation replaces the prior)."""
    return decay * old + (1 - decay) * observed


UPDATE_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "latest": replace_with_latest,
    "ema": exponential_moving_average,
}
"""How a new group's reward variance updates a query's estimate."""


def variance_priority(estimate: torch.Tensor, known: torch.Tensor, unvisited: float) -> torch.Tensor:
    """Priority [Q] = the variance estimate, or `unvisited` for queries with none yet."""
    return torch.where(known, estimate, torch.full_like(estimate, unvisited))


def uniform_priority(estimate: torch.Tensor, known: torch.Tensor, unvisited: float) -> torch.Tensor:
    """Every query equal: the seeded per-epoch tie-break permutation alone sets the order."""
    return torch.zeros_like(estimate)


ORDERS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "variance": variance_priority,
    "uniform": uniform_priority,
}
"""Priority of each query (higher first) before the deprioritised tier and the tie-break."""


@dataclass(frozen=True)
class ZeroVariancePolicy:
    """What happens to a group whose rewards are all equal."""

    keep_in_batch: bool
    """The group stays in the training batch."""
    resample: bool
    """Replacement queries are rolled out to refill the batch."""
    deprioritize: bool
    """The query ranks below all others until every other query has been visited since."""


ZERO_VARIANCE_POLICIES: dict[str, ZeroVariancePolicy] = {
    "skip": ZeroVariancePolicy(keep_in_batch=False, resample=False, deprioritize=False),
    "resample": ZeroVariancePolicy(keep_in_batch=False, resample=True, deprioritize=False),
    "deprioritize": ZeroVariancePolicy(keep_in_batch=True, resample=False, deprioritize=True),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """How queries are ordered and what is done with zero-variance groups."""

    order: str = "variance"
    """"variance": highest estimated reward variance first (Qwen2.5); "uniform": seeded permutation per epoch."""
    revisit: str = "epoch"
    """"epoch": each query at most once per pass over all queries; "batch": the top of the whole pool every batch
    (variance order only)."""
    update: str = "latest"
    """How a new group updates the estimate: "latest" replaces it, "ema" averages (keys of UPDATE_RULES)."""
    ema_decay: float = 0.5
    """With update="ema": weight of the previous estimate, in [0, 1)."""
    unvisited_priority: float = math.inf
    """Priority of a query with no estimate yet; +inf visits every query once before any repeats."""
    zero_variance: str = "skip"
    """"skip", "resample" or "deprioritize" (keys of ZERO_VARIANCE_POLICIES)."""
    zero_variance_tol: float = 1e-8
    """A group whose reward variance is at most this counts as zero-variance."""
    max_resample_factor: float = 1.0
    """With zero_variance="resample": at most this times batch_size replacement queries per batch."""
    seed: int = 0
    """Seed of the tie-break permutations."""

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"SchedulerConfig.order={self.order!r}: expected one of {sorted(ORDERS)}")
        if self.revisit not in ("epoch", "batch"):
            raise ValueError(f"SchedulerConfig.revisit={self.revisit!r}: expected 'epoch' or 'batch'")
        if self.order == "uniform" and self.revisit != "epoch":
            raise ValueError("SchedulerConfig: order='uniform' is a permutation per epoch; use revisit='epoch'")
        if self.update not in UPDATE_RULES:
            raise ValueError(f"SchedulerConfig.update={self.update!r}: expected one of {sorted(UPDATE_RULES)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"SchedulerConfig.ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.zero_variance not in ZERO_VARIANCE_POLICIES:
            raise ValueError(f"SchedulerConfig.zero_variance={self.zero_variance!r}: expected one of "
                             f"{sorted(ZERO_VARIANCE_POLICIES)}")
        if math.isnan(self.unvisited_priority):
            raise ValueError("SchedulerConfig.unvisited_priority: must not be NaN")
        if self.zero_variance_tol < 0 or self.max_resample_factor < 0:
            raise ValueError("SchedulerConfig: zero_variance_tol and max_resample_factor must be >= 0")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"SchedulerConfig.seed={self.seed}: must be in [0, 2**31)")

    def is_zero_variance(self, variance: torch.Tensor) -> torch.Tensor:
        """variance [Q] (reward_variance) -> [Q] bool: the groups that count as zero-variance."""
        return variance <= self.zero_variance_tol


def reward_variance(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased sample variance (divisor G - 1) of each group's rewards. rewards [Q, G], G >= 2 -> [Q] float64.

    Example: rewards [[1, 0, 1, 0]] -> mean 0.5, squared deviations sum to 1, variance 1 / 3."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_queries, G] with G >= 2 samples per query, got {tuple(rewards.shape)}")
    return rewards.detach().double().var(dim=1, correction=1)  # [Q]


@dataclass(frozen=True)
class ScheduledBatch(Generic[Payload]):
    """The groups of one training batch, and what the zero-variance policy did to reach it."""

    query_ids: list[int]
    """Kept queries, in the order they were rolled out."""
    payloads: list[Payload]
    """What `rollout` returned for each kept query (completions, token ids, ...)."""
    rewards: torch.Tensor  # [K, G] rewards of the kept groups
    dropped_ids: list[int]
    """Queries whose zero-variance group was dropped ("skip" and "resample")."""
    num_rollouts: int
    """Groups rolled out for this batch (kept + dropped)."""
    num_zero_variance: int
    """Of those, groups with zero reward variance (dropped or, with "deprioritize", kept)."""


class QueryScheduler:
    """Orders `num_queries` queries (ids 0..num_queries-1) for GRPO rollouts; see the module docstring."""

    def __init__(self, num_queries: int, config: SchedulerConfig):
        if num_queries < 1:
            raise ValueError(f"num_queries={num_queries}: need at least one query")
        self.num_queries = num_queries
        self.config = config
        self._update = UPDATE_RULES[config.update]
        self._priority = ORDERS[config.order]
        self._policy = ZERO_VARIANCE_POLICIES[config.zero_variance]
        self.estimate = torch.zeros(num_queries, dtype=torch.float64)  # [Q] variance estimate (valid where known)
        self.known = torch.zeros(num_queries, dtype=torch.bool)  # [Q] has an estimate
        self.visits = torch.zeros(num_queries, dtype=torch.long)  # [Q] groups observed
        self.last_visit = torch.full((num_queries,), -1, dtype=torch.long)  # [Q] clock of the latest group, -1 never
        self.deprioritized_at = torch.full((num_queries,), -1, dtype=torch.long)  # [Q] clock when flagged, -1 not
        self.pending = torch.ones(num_queries, dtype=torch.bool)  # [Q] not yet drawn in this epoch
        self.epoch = 0
        self.draws = 0  # next_batch calls
        self.clock = 0  # groups observed
        self.counts = {"groups": 0, "zero_variance_groups": 0, "dropped_groups": 0, "replacement_queries": 0}

    # ---- the loop a trainer runs ----------------------------------------------------------------------------------

    def collect(self, batch_size: int,
                rollout: Callable[[list[int]], tuple[Sequence[Payload], torch.Tensor]]) -> ScheduledBatch[Payload]:
        """Pick `batch_size` queries, roll them out, observe their rewards and apply the zero-variance policy.

        Args:
            batch_size: queries per training batch.
            rollout: query ids -> (one payload per query, rewards [len(ids), G]); called once, plus once per
                round of replacements with zero_variance="resample".
        Returns:
            the kept groups (fewer than batch_size when groups were skipped or the resample cap was reached).
        """
        query_ids = self.next_batch(batch_size)
        drawn = list(query_ids)
        kept_ids, kept_payloads, kept_rewards, dropped = [], [], [], []
        zero_before = self.counts["zero_variance_groups"]  # observe() counts them
        cap = math.floor(self.config.max_resample_factor * batch_size)
        replacements = 0
        while True:
            payloads, rewards = rollout(query_ids)
            if len(payloads) != len(query_ids) or rewards.shape[0] != len(query_ids):
                raise ValueError(f"rollout returned {len(payloads)} payloads and rewards {tuple(rewards.shape)} for "
                                 f"{len(query_ids)} queries")
            keep = self.observe(query_ids, rewards)
            for i, query in enumerate(query_ids):
                if keep[i]:
                    kept_ids.append(query)
                    kept_payloads.append(payloads[i])
                    kept_rewards.append(rewards[i])
                else:
                    dropped.append(query)
            need = min(batch_size - len(kept_ids), cap - replacements, self.num_queries - len(drawn))
            if not self._policy.resample or need <= 0:
                break
            query_ids = self.next_batch(need, exclude=drawn)
            drawn += query_ids
            replacements += need
            self.counts["replacement_queries"] += need
        group_size = kept_rewards[0].shape[0] if kept_rewards else rewards.shape[1]
        stacked = torch.stack(kept_rewards) if kept_rewards else torch.zeros(0, group_size)  # [K, G]
        num_zero = self.counts["zero_variance_groups"] - zero_before
        return ScheduledBatch(kept_ids, kept_payloads, stacked, dropped, len(drawn), num_zero)

    # ---- the two steps of collect, for trainers that drive rollouts themselves ----------------------------------

    def next_batch(self, size: int, exclude: Sequence[int] = ()) -> list[int]:
        """The `size` highest-priority queries (not in `exclude`), marked as drawn for this epoch.

        In epoch mode, when this epoch's undrawn queries run out a new epoch starts and the batch continues with
        its highest-priority queries (those of `exclude` or already in this batch stay undrawn in the new epoch)."""
        taken = torch.zeros(self.num_queries, dtype=torch.bool)  # [Q] in this batch or excluded
        taken[list(exclude)] = True
        if size < 0 or size > self.num_queries - int(taken.sum()):
            raise ValueError(f"next_batch: {size} queries requested, {self.num_queries - int(taken.sum())} available "
                             "without repeating one within the batch")
        self._clear_stale_deprioritization()
        self.draws += 1
        picked: list[int] = []
        while len(picked) < size:
            candidates = ~taken & self.pending if self.config.revisit == "epoch" else ~taken  # [Q]
            if not candidates.any():
                self.epoch += 1
                self.pending[:] = True
                continue
            ranked = self._ranked(candidates)[: size - len(picked)]
            picked += ranked.tolist()
            taken[ranked] = True
            self.pending[ranked] = False
        return picked

    def observe(self, query_ids: Sequence[int], rewards: torch.Tensor) -> torch.Tensor:
        """Update the estimates from new groups; returns keep [len(query_ids)] bool: whether each group stays in
        the training batch under the zero-variance policy.

        Args:
            query_ids: the queries the groups belong to.
            rewards: [len(query_ids), G] the rewards of each query's G sampled responses.
        """
        variance = reward_variance(rewards)  # [Q']
        zero = self.config.is_zero_variance(variance)  # [Q']
        for query, var, is_zero in zip(query_ids, variance, zero.tolist(), strict=True):
            self._set_estimate(query, var)
            self.clock += 1
            self.visits[query] += 1
            self.last_visit[query] = self.clock
            flagged = is_zero and self._policy.deprioritize
            self.deprioritized_at[query] = self.clock if flagged else -1
        keep = ~zero | self._policy.keep_in_batch  # [Q']
        self.counts["groups"] += len(query_ids)
        self.counts["zero_variance_groups"] += int(zero.sum())
        self.counts["dropped_groups"] += int((~keep).sum())
        return keep

    def seed_estimates(self, query_ids: Sequence[int], rewards: torch.Tensor) -> None:
        """Set estimates from a scoring pass before training (the report's ordering by the initial policy's
        rewards): the estimates change, nothing counts as a visit."""
        for query, var in zip(query_ids, reward_variance(rewards), strict=True):
            self._set_estimate(query, var)

    # ---- metrics and checkpoints -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Cumulative counters and the fraction of zero-variance groups, for logging."""
        groups = self.counts["groups"]
        known = self.estimate[self.known]
        return {
            **{k: float(v) for k, v in self.counts.items()},
            "zero_variance_fraction": self.counts["zero_variance_groups"] / groups if groups else 0.0,
            "epoch": float(self.epoch),
            "visited_fraction": float((self.visits > 0).double().mean()),
            "mean_variance_estimate": float(known.mean()) if known.numel() else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain lists and numbers (JSON-serialisable)."""
        return {
            "num_queries": self.num_queries,
            "config": asdict(self.config),
            "estimate": [float(v) if k else None for v, k in zip(self.estimate.tolist(), self.known.tolist(),
                                                                 strict=True)],
            "visits": self.visits.tolist(),
            "last_visit": self.last_visit.tolist(),
            "deprioritized_at": self.deprioritized_at.tolist(),
            "pending": self.pending.tolist(),
            "epoch": self.epoch,
            "draws": self.draws,
            "clock": self.clock,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the number of queries must match (the configuration may change)."""
        if state["num_queries"] != self.num_queries:
            raise ValueError(f"scheduler state is for {state['num_queries']} queries, this scheduler has "
                             f"{self.num_queries}")
        self.known = torch.tensor([v is not None for v in state["estimate"]], dtype=torch.bool)
        self.estimate = torch.tensor([0.0 if v is None else v for v in state["estimate"]], dtype=torch.float64)
        self.visits = torch.tensor(state["visits"], dtype=torch.long)
        self.last_visit = torch.tensor(state["last_visit"], dtype=torch.long)
        self.deprioritized_at = torch.tensor(state["deprioritized_at"], dtype=torch.long)
        self.pending = torch.tensor(state["pending"], dtype=torch.bool)
        self.epoch, self.draws, self.clock = state["epoch"], state["draws"], state["clock"]
        self.counts = dict(state["counts"])

    # ---- internals ---------------------------------------------------------------------------------------------

    def _set_estimate(self, query: int, variance: torch.Tensor) -> None:
        if self.known[query]:
            self.estimate[query] = self._update(self.estimate[query], variance, self.config.ema_decay)
        else:
            self.estimate[query] = variance
            self.known[query] = True

    def _clear_stale_deprioritization(self) -> None:
        """A deprioritised query returns to its normal rank once every other (not deprioritised) query has been
        visited after it was flagged."""
        flagged = self.deprioritized_at >= 0  # [Q]
        if not flagged.any():
            return
        others = self.last_visit[~flagged]  # [Q - F]; -1 for never-visited queries
        oldest = int(others.min()) if others.numel() else math.inf
        self.deprioritized_at[flagged & (self.deprioritized_at < oldest)] = -1

    def _ranked(self, candidates: torch.Tensor) -> torch.Tensor:
        """Candidate query ids [C], best first: by tier (not deprioritised first), priority, then the seeded
        tie-break permutation."""
        round_index = self.epoch if self.config.revisit == "epoch" else self.draws
        # torch's CPU generator keeps 32 bits of a seed: hash (seed, round) into them rather than add them.
        digest = hashlib.sha256(f"{self.config.seed}:{round_index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
        tiebreak = torch.randperm(self.num_queries, generator=generator)  # [Q] a random rank per query
        priority = self._priority(self.estimate, self.known, self.config.unvisited_priority)  # [Q]
        tier = (self.deprioritized_at < 0).long()  # [Q] 1 normal, 0 deprioritised
        ids = torch.nonzero(candidates).flatten()  # [C]
        # Lexicographic order by successive stable sorts, least significant key first.
        ids = ids[torch.sort(tiebreak[ids], descending=True, stable=True).indices]
        ids = ids[torch.sort(priority[ids], descending=True, stable=True).indices]
        return ids[torch.sort(tier[ids], descending=True, stable=True).indices]
