"""Ray actor groups whose members become the ranks of one torch.distributed group (gloo on the CPU).

    placement, actors = start_actors(MyActor, count=2, num_cpus=1, env_vars={"DS_ACCELERATOR": "cpu"}, args)
    form_process_group(actors, timeout_s=600)          # MyActor subclasses DistributedActor

Used by the reward worker's ZeRO-3 inference and the GRPO policy/reference workers: the one place where Ray
placement and process-group set-up live.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import timedelta

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class DistributedActor:
    """Methods an actor needs to become one rank of a torch.distributed gloo group (see form_process_group)."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def master_address(self) -> tuple[str, int]:
        """This node's address and a port free on it now (for rank 0 to serve as the group's master)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def init_process_group(self, master_addr: str, master_port: int, rank: int, world_size: int, local_rank: int,
                           local_world_size: int, timeout_s: float) -> None:
        """Join the group; every rank must call it at the same time. DS_ACCELERATOR must already be in the
        environment (the actor's runtime_env), since deepspeed reads it at import."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), LOCAL_SIZE=str(local_world_size),
                          LOCAL_WORLD_SIZE=str(local_world_size))
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))


def start_actors(actor_class: type, count: int, num_cpus: float, env_vars: dict[str, str],
                 *init_args) -> tuple[PlacementGroup, list[ray.actor.ActorHandle]]:
    """`count` actors of `actor_class` (a plain class), one per bundle of a PACK placement group (so ranks share
    a node when they fit), each with `num_cpus` CPUs and `env_vars` set before it imports anything."""
    group = placement_group([{"CPU": num_cpus}] * count, strategy="PACK")
    ray.get(group.ready())
    remote = ray.remote(actor_class)
    actors = [
        remote.options(num_cpus=num_cpus, runtime_env={"env_vars": env_vars},
                       scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i))
        .remote(*init_args)
        for i in range(count)
    ]
    return group, actors


def form_process_group(actors: Sequence[ray.actor.ActorHandle], timeout_s: float) -> None:
    """Make the DistributedActor `actors` ranks 0..N-1 of one gloo group: rank 0 picks a free port on its node
    and the others connect to it; local ranks count the ranks on the same Ray node."""
    node_ids = ray.get([actor.node_id.remote() for actor in actors])
    master_addr, master_port = ray.get(actors[0].master_address.remote())
    calls = []
    for rank, actor in enumerate(actors):
        same_node = [r for r, node in enumerate(node_ids) if node == node_ids[rank]]
        calls.append(actor.init_process_group.remote(master_addr, master_port, rank, len(actors),
                                                     same_node.index(rank), len(same_node), timeout_s))
    ray.get(calls)


def zero3_inference_config() -> dict:
    """DeepSpeed config for parameter partitioning without an optimizer: ZeRO-3 with no optimizer creates only
    its parameter-offload wrapper (partitioning, gather/release hooks around each module's forward)."""
    return {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
