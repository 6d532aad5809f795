"""align.actors: the per-role resources every Ray worker group takes from the config."""

import pytest

from align.actors import ActorResources, retry_after_restarts, slice_starts, split_evenly


def test_actor_resources_check_their_fields_and_name_the_accelerator():
    assert ActorResources().accelerator_env() == {"DS_ACCELERATOR": "cpu"}  # deepspeed would look for CUDA
    assert ActorResources(num_gpus=1).accelerator_env() == {}
    with pytest.raises(ValueError, match="placement_strategy='pack'"):
        ActorResources(placement_strategy="pack")
    with pytest.raises(ValueError, match="num_gpus=-1"):
        ActorResources(num_gpus=-1)
    with pytest.raises(ValueError, match="num_actors=0"):
        ActorResources(num_actors=0)


def test_split_evenly_gives_contiguous_slices_the_first_ones_larger():
    assert split_evenly(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split_evenly([7], 3) == [[7], [], []]
    assert split_evenly([], 2) == [[], []]


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8])
def test_slice_starts_give_every_item_its_index_in_the_whole_however_it_is_split(parts):
    items = list(range(7))
    slices = split_evenly(items, parts)
    starts = slice_starts(slices)
    assert [start + i for start, part in zip(starts, slices, strict=True) for i in range(len(part))] == items
    assert all(part[0] == start for start, part in zip(starts, slices, strict=True) if part)


def test_slice_starts_by_hand():
    assert slice_starts([["a", "b", "c"], ["d", "e"]]) == [0, 3]
    assert slice_starts([[], ["x"]]) == [0, 0]


def test_retry_after_restarts_retries_lost_actors_only_and_counts_restarts():
    failures = [LookupError("lost"), LookupError("lost")]

    def call():
        if failures:
            raise failures.pop()
        return "done"

    recovered = []

    def recover():
        recovered.append(1)
        return 1  # the recovery itself met one more restart

    result = retry_after_restarts(call, lost=lambda e: isinstance(e, LookupError), recover=recover, max_retries=2,
                                  what="test")
    assert result == ("done", 4) and len(recovered) == 2  # 2 retries, each recover() saw one more restart

    failures[:] = [LookupError("lost")] * 3
    with pytest.raises(LookupError):
        retry_after_restarts(call, lost=lambda e: True, recover=lambda: 0, max_retries=2, what="test")
    assert not failures  # called 3 times: once plus 2 retries
    failures[:] = [ValueError("a bug, not a lost actor")]
    with pytest.raises(ValueError):
        retry_after_restarts(call, lost=lambda e: isinstance(e, LookupError), recover=lambda: 0, max_retries=5,
                             what="test")
