"""Ray actor groups whose members become the ranks of one torch.distributed group (gloo on the CPU).

    placement, actors = start_actors(MyActor, ActorResources(num_actors=2), env_vars, args)
    form_process_group(actors, timeout_s=600)          # MyActor subclasses DistributedActor

Used by the rollout, reward and GRPO policy/reference workers: the one place where Ray placement and
process-group set-up live. On the CPU the group talks gloo; on GPUs (each actor given `num_gpus`, Ray showing it
only its own devices) NCCL, which is not run on the project's CPU-only machines.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import accumulate, pairwise
from typing import TypeVar

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

T = TypeVar("T")


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

        backend = "gloo"
        if torch.cuda.is_available():  # Ray shows a GPU actor only its own device, so it is cuda:0 here
            os.environ["LOCAL_RANK"] = "0"
            torch.cuda.set_device(0)
            backend = "nccl"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ActorResources:
    """What a role's Ray actors get: how many, their CPUs and GPUs, and how their bundles are placed."""

    num_actors: int = 1
    """Actors of the role."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per actor (fractions let several actors share cores)."""
    num_gpus: float = 0.0
    """Ray GPUs per actor (0 on the CPU; 1 for a ZeRO-3 rank or a vLLM engine on GPUs)."""
    placement_strategy: str = "PACK"
    """Ray placement-group strategy of the role's bundles (PACK: share nodes when they fit; SPREAD: across)."""
    torch_threads: int = 1
    """torch threads per actor (each process otherwise assumes it owns every core)."""

    def __post_init__(self):
        if self.num_actors < 1 or self.torch_threads < 1:
            raise ValueError(f"ActorResources: num_actors={self.num_actors} and torch_threads={self.torch_threads} "
                             "must be >= 1")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"ActorResources: num_cpus={self.num_cpus} must be > 0, num_gpus={self.num_gpus} >= 0")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"ActorResources.placement_strategy={self.placement_strategy!r}: expected one of "
                             f"{PLACEMENT_STRATEGIES}")

    def accelerator_env(self) -> dict[str, str]:
        """Environment for a DeepSpeed actor: deepspeed picks its accelerator at import, so CPU actors name it."""
        return {} if self.num_gpus else {"DS_ACCELERATOR": "cpu"}


def start_actors(actor_class: type, resources: ActorResources, env_vars: dict[str, str], *init_args,
                 max_restarts: int = 0) -> tuple[PlacementGroup, list[ray.actor.ActorHandle]]:
    """`resources.num_actors` actors of `actor_class` (a plain class), one per bundle of a placement group, each
    with its CPUs and GPUs and `env_vars` (plus OMP_NUM_THREADS) set before it imports anything. Ray restarts an
    actor that dies up to `max_restarts` times, running its constructor again."""
    bundle = {"CPU": resources.num_cpus, **({"GPU": resources.num_gpus} if resources.num_gpus else {})}
    group = placement_group([bundle] * resources.num_actors, strategy=resources.placement_strategy)
    ray.get(group.ready())
    env = {"OMP_NUM_THREADS": str(resources.torch_threads), **env_vars}
    remote = ray.remote(actor_class)
    actors = [
        remote.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=max_restarts,
                       runtime_env={"env_vars": env},
                       scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i))
        .remote(*init_args)
        for i in range(resources.num_actors)
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


def retry_after_restarts(call: Callable[[], T], lost: Callable[[Exception], bool], recover: Callable[[], int],
                         max_retries: int, what: str) -> tuple[T, int]:
    """call(); when it fails because an actor was lost (`lost(error)`; Ray restarts the actor), `recover()` and call
    again, at most `max_retries` times. Returns the result and the restarts seen: one per retry, plus those
    recover() reports (a re-sync can itself meet a restart)."""
    retries = restarts = 0
    while True:
        try:
            return call(), restarts
        except Exception as error:
            if retries == max_retries or not lost(error):
                raise
            retries += 1
            tqdm.write(f"{what}: an actor was lost ({error}); retrying")
            restarts += 1 + recover()


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """`parts` contiguous slices whose sizes differ by at most one (the first ones larger)."""
    size, extra = divmod(len(items), parts)
    bounds = list(accumulate((size + (part < extra) for part in range(parts)), initial=0))
    return [list(items[start:end]) for start, end in pairwise(bounds)]


def slice_starts(slices: Sequence[Sequence]) -> list[int]:
    """The index in the whole of each slice's first item: [[a, b, c], [d, e]] -> [0, 3]. A rollout actor seeds
    prompt `start + i` of its slice as the whole call's prompt `start + i`, so samples do not depend on how many
    actors share the call."""
    return list(accumulate((len(part) for part in slices[:-1]), initial=0))


def zero3_inference_config() -> dict:
    """DeepSpeed config for parameter partitioning without an optimizer: ZeRO-3 with no optimizer creates only
    its parameter-offload wrapper (partitioning, gather/release hooks around each module's forward)."""
    return {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
