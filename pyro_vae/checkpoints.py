"""What ``checkpoint.pt`` holds: the loop's position, the model and optimizer state and every
random-number stream, so that a resumed run continues exactly where it stopped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed
from .errors import ConfigError


@dataclass
class LoopState:
    """Everything that makes a run continue exactly where it stopped (see ``checkpoint.pt``)."""

    epoch: int = 1                        # the epoch in progress (or about to start)
    position: int = 0                     # datapoints of that epoch already consumed
    step: int = 0                         # optimizer steps taken so far
    order: torch.Tensor | None = None     # this epoch's permutation, while it is in progress
    loss_sum: float = 0.0                 # the epoch's weighted loss so far


def state_dict(vae, optimizer, state: LoopState, order_generator: torch.Generator,
                rank_states: list[dict] | None = None) -> dict:
    device = vae.device
    rng = {"torch": torch.get_rng_state(), "order": order_generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if rank_states is not None:  # under torchrun: every rank's stream, in rank order
        rng["ranks"] = rank_states
    return {"model": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": rng, "epoch": state.epoch,
            "position": state.position, "step": state.step,
            "order": None if state.order is None else state.order.cpu(),
            "loss_sum": state.loss_sum}


def checkpoint_processes(checkpoint: dict) -> int:
    """How many torchrun processes wrote ``checkpoint`` (1 for a single process)."""
    ranks = checkpoint["rng"].get("ranks")
    return 1 if ranks is None else len(ranks)


def load_state(checkpoint: dict, vae, optimizer, order_generator: torch.Generator,
                context: distributed.Context = distributed.SINGLE) -> LoopState:
    vae.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"]
    if context.distributed:
        if checkpoint_processes(checkpoint) != context.world_size:
            raise ConfigError(f"the checkpoint was written by {checkpoint_processes(checkpoint)} "
                              f"process(es), and {context.world_size} were started")
        rng = {**rng, **rng["ranks"][context.rank]}  # this rank's own stream
    torch.set_rng_state(rng["torch"])
    order_generator.set_state(rng["order"])
    if "cuda" in rng and vae.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], vae.device)
    order = checkpoint["order"]
    return LoopState(epoch=int(checkpoint["epoch"]), position=int(checkpoint["position"]),
                      step=int(checkpoint["step"]),
                      order=order,  # placed by the loop (device or host)
                      loss_sum=float(checkpoint["loss_sum"]))
