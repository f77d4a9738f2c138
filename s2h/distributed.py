"""Data-parallel training for ``torchrun ... -m s2h prune``: process group, gradient averaging.

Why not ``DistributedDataParallel``: one S2H step runs two backward passes over one graph (the
gate-only backward of the mask-side gap term with ``retain_graph=True``, then the main one), and
the gates live outside the model in ``pruner.gates``. DDP's reducer fires its hooks on whichever
backward reaches a parameter first, expects every parameter once per forward and cannot see the
gates; it needs ``find_unused_parameters`` / ``static_graph`` tricks that differ between torch
versions. Averaging the gradients ourselves, after both backward passes and before the optimizer
step, is exactly what DDP computes (the mean of the per-rank gradients) and has no such traps.

Every rank builds the same model from the same seed; :func:`broadcast_state` makes that exact.
BatchNorm running statistics are per rank during an epoch (as with DDP's default of
broadcasting buffers from rank 0 at each forward, only rank 0's matter): they are broadcast from
rank 0 before anything is evaluated or saved.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``local_rank`` picks the GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's ``RANK`` / ``WORLD_SIZE`` variables.

    NCCL for CUDA devices, gloo otherwise. Without those variables (or with a world of one)
    nothing is initialised and a single-process :class:`DistInfo` is returned.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@torch.no_grad()
def broadcast_state(modules: Iterable[nn.Module], info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers (BN statistics, gate orders) to every rank."""
    if not info.enabled:
        return
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
            # written through .data: tell the caches keyed on version counters (a gate's kept
            # index, the gate bank's mask index) that the tensor changed
            torch.autograd.graph.increment_version(t)


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor], info: DistInfo,
                      bucket_bytes: int = 32 << 20) -> None:
    """Replace every ``p.grad`` by its mean over the ranks (in place), in flat buckets.

    Parameters without a gradient are skipped; which ones have none is decided by the graph,
    which is the same on every rank, so the buckets line up. Infinite/NaN values (an fp16
    overflow on one rank) propagate to all ranks, so the grad scaler skips the step everywhere.
    """
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(info.world_size)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
        bucket.clear()

    for g in grads:
        # One bucket holds one dtype (fp32 weights and fp32 gates in practice).
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size()
                       > bucket_bytes):
            flush()
            size = 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()


def default_world_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks of the default process group (a new float64 tensor on
    ``values``'s device; ``values`` itself when there is no group of more than one process).

    For statistics that decide something every rank must decide alike (STP's per-candidate KD
    losses): float64 on the wire; the collective hands every rank the same reduced values."""
    if default_world_size() <= 1:
        return values
    device = values.device
    wire = values.detach().to(torch.float64)
    if dist.get_backend() == "nccl":
        wire = wire.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        wire = wire.cpu()
    dist.all_reduce(wire)
    return wire.to(device)
