"""align.actors: the per-role resources every Ray worker group takes from the config."""

import pytest

from align.actors import ActorResources


def test_actor_resources_check_their_fields_and_name_the_accelerator():
    assert ActorResources().accelerator_env() == {"DS_ACCELERATOR": "cpu"}  # deepspeed would look for CUDA
    assert ActorResources(num_gpus=1).accelerator_env() == {}
    with pytest.raises(ValueError, match="placement_strategy='pack'"):
        ActorResources(placement_strategy="pack")
    with pytest.raises(ValueError, match="num_gpus=-1"):
        ActorResources(num_gpus=-1)
    with pytest.raises(ValueError, match="num_actors=0"):
        ActorResources(num_actors=0)
