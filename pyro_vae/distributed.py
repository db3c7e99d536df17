"""Multi-process training with ``torchrun`` and torch.distributed (DDP).

``torchrun --nproc_per_node=N -m pyro_vae.cli train ...`` starts N processes. Each takes its
shard of every global minibatch (the same seeded permutation on every rank, split into N
contiguous parts), computes the objective on it with the data-set scale ``num_data / shard``, and
DDP averages the gradients, so an update equals that of one process on the whole minibatch with
the same random draws. Ranks draw independent noise (seed + rank). Each rank scores its part
of the validation split and the sums are all-reduced, so every rank reports the same validation
ELBO. Rank 0 alone writes the run directory. A SIGINT or SIGTERM to any rank is agreed on by all
at the next logging step (every ``log_every`` steps), so every rank stops at the same step and
rank 0 saves the checkpoint, with every rank's random-number state: ``pyro-vae train --resume``
under torchrun with the same number of processes continues exactly, and in one process it
continues with rank 0's stream. Backends: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global minibatch of indices."""
        return batch.tensor_split(self.world_size)[self.rank] if self.distributed else batch

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def rng_states(self) -> list[dict] | None:
        """Every rank's random-number state, in rank order (a collective: every rank calls it at
        the same point), for a checkpoint that resumes each rank's own stream; ``None`` in one
        process."""
        if not self.distributed:
            return None
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        states: list = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def agreed_signal(self, signal_name: str | None) -> str | None:
        """The stop request (a signal's name) of any rank, the same on every rank. A collective:
        every rank calls it at the same step, so that all of them stop at that step."""
        if not self.distributed:
            return signal_name
        number = 0 if signal_name is None else int(signal.Signals[signal_name])
        flag = torch.tensor([number], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        number = int(flag)
        return None if number == 0 else signal.Signals(number).name


SINGLE = Context()


def context_from_environment(device: torch.device) -> Context:
    """The torchrun context (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), initialising the process
    group on first use; a plain process gets the single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"torchrun started {world_size} processes on this node, but only "
                              f"{torch.cuda.device_count()} CUDA device(s) exist")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world_size, device=device)


class LossModule(nn.Module):
    """The objective as a module that owns the VAE's parameters (what DDP wraps)."""

    def __init__(self, vae: nn.Module, objective):
        super().__init__()
        from .lvm import programs

        self.vae, self.objective = vae, objective
        #: the model's (model, guide), callable with (x, y, num_data) (:func:`pyro_vae.lvm.programs`)
        self.programs = programs(vae)

    def forward(self, x, y=None, num_data=None):
        return self.objective.differentiable_loss(*self.programs, x, y, num_data=num_data)


def wrap(vae: nn.Module, objective, context: Context) -> nn.Module:
    """The loss module, under DDP when running distributed."""
    module = LossModule(vae, objective)
    if not context.distributed:
        return module
    device_ids = [context.device] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
