"""rollout/scheduler.py: queries ordered by reward variance, estimate updates, the three zero-variance policies,
the uniform baseline, and resume from a state dict. Every expected order is worked out by hand from the rewards.

Groups of G = 2 rewards [0, d] have unbiased variance d^2 / 2, so d = 1, 2, 3 give variances 0.5, 2, 4.5."""

import json
import math

import pytest
import torch

from rollout.scheduler import QueryScheduler, SchedulerConfig, reward_variance


def pair(d: float) -> list[float]:
    """Two rewards whose unbiased variance is d^2 / 2."""
    return [0.0, d]


def rewards(*ds: float) -> torch.Tensor:
    return torch.tensor([pair(d) for d in ds])  # [Q, 2]


class ScriptedRollout:
    """rollout(ids) for QueryScheduler.collect: query q's k-th visit gets rewards pair(script[q][k]) (or its last
    entry once the script runs out); records every call."""

    def __init__(self, script: dict[int, list[float]]):
        self.script = script
        self.visits = {q: 0 for q in script}
        self.calls: list[list[int]] = []

    def __call__(self, ids: list[int]) -> tuple[list[str], torch.Tensor]:
        self.calls.append(list(ids))
        ds = []
        for q in ids:
            steps = self.script[q]
            ds.append(steps[min(self.visits[q], len(steps) - 1)])
            self.visits[q] += 1
        return [f"completions of {q}" for q in ids], rewards(*ds)


def test_reward_variance_by_hand():
    """[1, 0, 1, 0]: mean 0.5, squared deviations 4 * 0.25 = 1, divisor G - 1 = 3 -> 1/3. [2, 2] -> 0."""
    var = reward_variance(torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    torch.testing.assert_close(var, torch.tensor([1 / 3, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="G >= 2"):
        reward_variance(torch.tensor([[1.0], [0.0]]))


def test_highest_variance_first_within_an_epoch():
    """Estimates from a scoring pass: d = [1, 2, 0, 3, 1.5] -> variances [0.5, 2, 0, 4.5, 1.125]; batches of 2
    take 3, 1 | 4, 0 | 2 and then, in a new epoch, the same order again."""
    sched = QueryScheduler(5, SchedulerConfig(order="variance", zero_variance="deprioritize"))
    sched.seed_estimates([0, 1, 2, 3, 4], rewards(1, 2, 0, 3, 1.5))
    assert sched.next_batch(2) == [3, 1]
    assert sched.next_batch(2) == [4, 0]
    assert sched.next_batch(2) == [2, 3]  # the epoch ends after 2; epoch 1 starts with its best, query 3
    assert sched.epoch == 1
    assert sched.next_batch(3) == [1, 4, 0]
    with pytest.raises(ValueError, match="available"):
        sched.next_batch(6)


def test_unvisited_queries_use_the_prior():
    """Queries 0, 1 scored (variance 0.5, 2), queries 2, 3 not. With the +inf prior both unvisited come first; with
    prior 1.0 they sit between query 1 (2.0) and query 0 (0.5), in the seeded tie-break order."""
    first = QueryScheduler(4, SchedulerConfig())
    first.seed_estimates([0, 1], rewards(1, 2))
    top = first.next_batch(2)
    assert sorted(top) == [2, 3] and first.next_batch(2) == [1, 0]

    prior = QueryScheduler(4, SchedulerConfig(unvisited_priority=1.0))
    prior.seed_estimates([0, 1], rewards(1, 2))
    order = prior.next_batch(4)
    assert order[0] == 1 and sorted(order[1:3]) == [2, 3] and order[3] == 0
    assert order[1:3] == top  # the same seed and epoch break the tie the same way


def test_latest_and_ema_updates_change_the_next_pick():
    """revisit="batch": query 0 starts at 4.5, 1 at 2, 2 at 0.5. Query 0's next group has variance 0.5.
    latest: its estimate becomes 0.5, so query 1 (2.0) is next. ema with decay 0.5: 0.5 * 4.5 + 0.5 * 0.5 = 2.5,
    still above 2, so query 0 is drawn again."""
    for update, estimate, expected_next in (("latest", 0.5, 1), ("ema", 2.5, 0)):
        sched = QueryScheduler(3, SchedulerConfig(revisit="batch", update=update, ema_decay=0.5))
        sched.observe([0, 1, 2], rewards(3, 2, 1))
        assert sched.next_batch(1) == [0]
        sched.observe([0], rewards(1))
        assert sched.estimate[0].item() == pytest.approx(estimate)
        assert sched.next_batch(1) == [expected_next]
        assert sched.visits.tolist() == [2, 1, 1]


def test_epoch_mode_visits_each_query_once_but_batch_mode_repeats_the_best():
    """Estimates 4.5, 2, 0.5 for queries 0, 1, 2 and every new group keeps them. Epoch mode: batches of 1 give
    0, 1, 2, 0, 1, 2. Batch mode: query 0 every time."""
    for revisit, expected in (("epoch", [0, 1, 2, 0, 1, 2]), ("batch", [0] * 6)):
        sched = QueryScheduler(3, SchedulerConfig(revisit=revisit))
        sched.seed_estimates([0, 1, 2], rewards(3, 2, 1))
        drawn = []
        for _ in range(6):
            (q,) = sched.next_batch(1)
            drawn.append(q)
            sched.observe([q], rewards({0: 3, 1: 2, 2: 1}[q]))
        assert drawn == expected


def test_skip_drops_zero_variance_groups_and_counts_them():
    """Scored variances 4.5, 2, 1.125, 0.5, 0.125, 0.02 for queries 0..5 set the order. Batch of 4 takes 0, 1, 2, 3;
    queries 1 and 3 come back with equal rewards, so the batch keeps 0 and 2 and counts 2 of 4 groups as zero."""
    sched = QueryScheduler(6, SchedulerConfig(zero_variance="skip"))
    sched.seed_estimates(range(6), rewards(3, 2, 1.5, 1, 0.5, 0.2))
    rollout = ScriptedRollout({0: [3], 1: [0], 2: [1], 3: [0], 4: [1], 5: [1]})
    batch = sched.collect(4, rollout)
    assert rollout.calls == [[0, 1, 2, 3]]
    assert batch.query_ids == [0, 2] and batch.dropped_ids == [1, 3]
    assert batch.payloads == ["completions of 0", "completions of 2"]
    torch.testing.assert_close(batch.rewards, rewards(3, 1))
    assert (batch.num_rollouts, batch.num_zero_variance) == (4, 2)
    metrics = sched.metrics()
    assert metrics["zero_variance_fraction"] == 0.5 and metrics["dropped_groups"] == 2.0


def test_resample_refills_the_batch_up_to_the_cap():
    """As in the skip test, 1 and 3 are dropped; replacements come next by priority: 4 (kept) and 5 (zero
    variance, dropped). The batch then has 3 groups and no query is left in the epoch to draw, so it stops there
    (6 rollouts). With max_resample_factor 0.25 (cap 1 replacement) only query 4 is drawn."""
    script = {0: [3], 1: [0], 2: [1], 3: [0], 4: [1], 5: [0]}
    sched = QueryScheduler(6, SchedulerConfig(zero_variance="resample", max_resample_factor=1.0))
    sched.seed_estimates(range(6), rewards(3, 2, 1.5, 1, 0.5, 0.2))
    rollout = ScriptedRollout(script)
    batch = sched.collect(4, rollout)
    assert rollout.calls == [[0, 1, 2, 3], [4, 5]]
    assert batch.query_ids == [0, 2, 4] and batch.dropped_ids == [1, 3, 5]
    assert (batch.num_rollouts, batch.num_zero_variance) == (6, 3)
    assert sched.metrics()["replacement_queries"] == 2.0

    capped = QueryScheduler(6, SchedulerConfig(zero_variance="resample", max_resample_factor=0.25))
    capped.seed_estimates(range(6), rewards(3, 2, 1.5, 1, 0.5, 0.2))
    rollout = ScriptedRollout(script)
    batch = capped.collect(4, rollout)
    assert rollout.calls == [[0, 1, 2, 3], [4]]
    assert batch.query_ids == [0, 2, 4] and batch.num_rollouts == 5


def test_resample_never_repeats_a_query_within_the_batch_across_an_epoch_boundary():
    """3 queries, batch of 3, every group zero-variance except query 2's: after [0, 1, 2] the epoch is spent and
    all 3 are in the batch already, so no replacement can be drawn: the batch is [2], and the next batch (a new
    epoch) can draw all three again."""
    sched = QueryScheduler(3, SchedulerConfig(zero_variance="resample", max_resample_factor=2.0))
    sched.seed_estimates(range(3), rewards(3, 2, 1))
    rollout = ScriptedRollout({0: [0], 1: [0], 2: [1]})
    batch = sched.collect(3, rollout)
    assert batch.query_ids == [2] and rollout.calls == [[0, 1, 2]]
    assert sorted(sched.next_batch(3)) == [0, 1, 2]


def test_deprioritize_keeps_the_group_and_ranks_the_query_last_until_the_others_are_visited():
    """ema (decay 0.5), batch mode. Estimates 4.5, 2, 0.5 (queries 0, 1, 2). Query 0's next group has equal rewards:
    it stays in the batch and its estimate becomes 0.5 * 4.5 = 2.25, still above query 1's 2 (under "skip" query 0
    is drawn again), but deprioritised it yields to query 1. Query 1's group is flat too (estimate 1, deprioritised),
    so query 2 (0.5) is next although both others rank higher. Once both were visited after query 0, it is back on
    top. Zero-variance groups: 2 of 6."""
    for policy, after_zero in (("skip", [0]), ("deprioritize", [1])):
        sched = QueryScheduler(3, SchedulerConfig(revisit="batch", update="ema", ema_decay=0.5,
                                                  zero_variance=policy))
        sched.observe([0, 1, 2], rewards(3, 2, 1))
        batch = sched.collect(1, ScriptedRollout({0: [0], 1: [0], 2: [1]}))
        assert sched.estimate[0].item() == pytest.approx(2.25)
        assert batch.num_zero_variance == 1
        assert sched.next_batch(1) == after_zero
    assert batch.query_ids == [0] and batch.dropped_ids == []
    sched.observe([1], rewards(0))
    assert sched.next_batch(1) == [2]
    sched.observe([2], rewards(1))
    assert sched.next_batch(1) == [0]
    assert sched.metrics()["zero_variance_fraction"] == pytest.approx(2 / 6)


def test_uniform_order_is_a_seeded_permutation_per_epoch():
    """7 queries in batches of 3 over 3 epochs: every run of 7 draws is a permutation of 0..6 (batches straddle
    epochs without repeating a query), epochs differ, and the same seed gives the same sequence."""

    def draws(seed: int) -> list[int]:
        sched = QueryScheduler(7, SchedulerConfig(order="uniform", seed=seed))
        out = []
        for _ in range(7):
            batch = sched.next_batch(3)
            assert len(set(batch)) == 3
            sched.observe(batch, rewards(*[1.0] * 3))
            out += batch
        return out

    seq = draws(seed=0)
    epochs = [seq[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    assert draws(seed=0) == seq and draws(seed=1) != seq


def test_state_dict_round_trip_resumes_identically():
    """Run 3 batches, save (through JSON), restore into a fresh scheduler; both then give the same batches,
    estimates and metrics under the same future rewards."""
    cfg = SchedulerConfig(update="ema", zero_variance="deprioritize", unvisited_priority=math.inf, seed=3)
    script = {q: [q % 3, (q + 1) % 3, 0] for q in range(9)}
    sched = QueryScheduler(9, cfg)
    rollout = ScriptedRollout(script)
    for _ in range(3):
        sched.collect(4, rollout)
    state = json.loads(json.dumps(sched.state_dict()))
    resumed = QueryScheduler(9, cfg)
    resumed.load_state_dict(state)
    twin = ScriptedRollout(script)
    twin.visits = dict(rollout.visits)
    for _ in range(4):
        a, b = sched.collect(4, rollout), resumed.collect(4, twin)
        assert a.query_ids == b.query_ids and a.dropped_ids == b.dropped_ids
    torch.testing.assert_close(sched.estimate, resumed.estimate)
    assert sched.metrics() == resumed.metrics()
    with pytest.raises(ValueError, match="9 queries"):
        QueryScheduler(8, cfg).load_state_dict(state)


def test_config_checks():
    with pytest.raises(ValueError, match="order"):
        SchedulerConfig(order="random")
    with pytest.raises(ValueError, match="uniform"):
        SchedulerConfig(order="uniform", revisit="batch")
    with pytest.raises(ValueError, match="zero_variance"):
        SchedulerConfig(zero_variance="drop")
    with pytest.raises(ValueError, match="ema_decay"):
        SchedulerConfig(ema_decay=1.0)

