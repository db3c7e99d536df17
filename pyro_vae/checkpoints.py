"""What ``checkpoint.pt`` holds: the loop's position, the model and optimizer state and every
random-number stream, so that a resumed run continues exactly where it stopped.

:func:`validate_checkpoint` checks a loaded checkpoint before anything of it is used: a damaged
one, or another run's, is refused in one line (:class:`~pyro_vae.runs.RunError`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .lvm import device_of
from . import distributed
from .errors import ConfigError
from .runs import RunError

#: the entries of every checkpoint
REQUIRED = ("model", "optimizer", "rng", "epoch", "position", "step", "order", "loss_sum")


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
    device = device_of(vae)
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
                context: distributed.Context = distributed.SINGLE, *,
                num_train: int | None = None, where: str = "the checkpoint") -> LoopState:
    """Restore ``checkpoint`` into the model, the optimizer and the random-number streams, and
    return the loop's position. The checkpoint is checked first (:func:`validate_checkpoint`,
    against ``vae`` and, when given, ``num_train``): nothing is restored from a damaged one."""
    validate_checkpoint(checkpoint, vae, num_train, where=where)
    mismatch = _groups_mismatch(checkpoint["optimizer"]["param_groups"],
                                optimizer.state_dict()["param_groups"])
    if mismatch is None:
        try:
            vae.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            text = str(exc).strip()
            mismatch = text.splitlines()[0] if text else type(exc).__name__
    if mismatch is not None:
        raise RunError(f"{where} does not fit this training's optimizer ({mismatch}); restore "
                       "the run's own checkpoint.pt, or start a new run")
    rng = checkpoint["rng"]
    if context.distributed:
        if checkpoint_processes(checkpoint) != context.world_size:
            raise ConfigError(f"the checkpoint was written by {checkpoint_processes(checkpoint)} "
                              f"process(es), and {context.world_size} were started")
        rng = {**rng, **rng["ranks"][context.rank]}  # this rank's own stream
    torch.set_rng_state(rng["torch"])
    order_generator.set_state(rng["order"])
    if "cuda" in rng and device_of(vae).type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device_of(vae))
    order = checkpoint["order"]
    return LoopState(epoch=int(checkpoint["epoch"]), position=int(checkpoint["position"]),
                      step=int(checkpoint["step"]),
                      order=order,  # placed by the loop (device or host)
                      loss_sum=float(checkpoint["loss_sum"]))


# -- checking a loaded checkpoint --------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _names(keys, limit: int = 3) -> str:
    keys = sorted(str(k) for k in keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def describe_mismatch(module: torch.nn.Module, state: Any) -> str | None:
    """Why ``state`` is not a ``state_dict`` of ``module`` (one line), or ``None`` if it is:
    missing or unexpected entries, an entry that is not a tensor, or a tensor of another shape."""
    if not isinstance(state, dict):
        return f"it holds {type(state).__name__}, not a state_dict"
    own = module.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing:
        return f"it lacks {_names(missing)}"
    if unexpected:
        return f"it has entries the model does not: {_names(unexpected)}"
    for key, tensor in own.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key} is {type(value).__name__}, not a tensor"
        if value.shape != tensor.shape:
            return (f"{key} has shape {list(value.shape)}, and the model's has "
                    f"{list(tensor.shape)}")
    return None


def _rng_state_error(state: Any) -> str | None:
    """Why ``state`` is not a CPU generator's state (``torch.get_rng_state()``), or ``None``."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.ndim != 1:
        return "not a byte tensor"
    try:
        torch.Generator().set_state(state.clone())
    except (RuntimeError, TypeError, ValueError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else "not a generator state"
    return None


def _optimizer_errors(optimizer: Any, vae) -> tuple[str | None, str | None]:
    """Why ``optimizer`` is not a ``torch.optim`` state_dict (damage), and, given ``vae``, why it
    is not the state of one optimizer over ``vae``'s parameters (another model's); ``None``s
    when it is."""
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return "its optimizer state is not an optimizer's state_dict", None
    indices: list[int] = []
    for group in optimizer["param_groups"]:
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(_is_int(i) for i in group["params"])):
            return "its optimizer's parameter groups are damaged", None
        indices.extend(group["params"])
    for index, entry in optimizer["state"].items():
        if not (isinstance(entry, dict) and all(isinstance(v, torch.Tensor) or _is_number(v)
                                                for v in entry.values())):
            return f"its optimizer's state of parameter {index!r} is damaged", None
    if vae is None:
        return None, None
    parameters = list(vae.parameters())
    if sorted(indices) != list(range(len(parameters))):
        return None, (f"its optimizer holds {len(indices)} parameters, and the model has "
                      f"{len(parameters)}")
    for index, entry in optimizer["state"].items():
        if index not in indices:
            return None, f"its optimizer has a state for parameter {index!r}, which it lacks"
        shape = parameters[index].shape
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != shape:
                return None, (f"its optimizer's {name} of parameter {index} has shape "
                              f"{list(value.shape)}, and the parameter {list(shape)}")
    return None, None


def _same_kind(saved: Any, live: Any) -> bool:
    if live is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(live, bool):
        return isinstance(saved, bool)
    if _is_number(live):
        return _is_number(saved) or (isinstance(saved, torch.Tensor) and saved.numel() == 1)
    if isinstance(live, (tuple, list)):
        return (isinstance(saved, (tuple, list)) and len(saved) == len(live)
                and all(_same_kind(a, b) for a, b in zip(saved, live)))
    return True


#: Adam's choice of implementation, not of the update: a checkpoint written by another one (an
#: older pyro-vae's default Adam: ``None``) is restored with its own, and the run continues as
#: it trained
_IMPLEMENTATION_KEYS = ("foreach", "fused")


def _groups_mismatch(saved: list[dict], live: list[dict]) -> str | None:
    """Why the saved parameter groups cannot replace the live optimizer's (their number, a
    missing hyperparameter, one of another type), or ``None``."""
    if len(saved) != len(live):
        return f"it has {len(saved)} parameter groups, and the optimizer {len(live)}"
    for group, own in zip(saved, live):
        for key, value in own.items():
            if key == "params":
                continue
            if key in _IMPLEMENTATION_KEYS and group.get(key, None) in (None, True, False):
                continue
            if key not in group:
                return f"its parameter group has no {key!r}"
            if not _same_kind(group[key], value):
                return f"its {key!r} is {group[key]!r}"
    return None


def validate_checkpoint(checkpoint: Any, vae=None, num_train: int | None = None,
                        where: str = "the checkpoint") -> None:
    """Refuse, in one line that names ``where`` (:class:`~pyro_vae.runs.RunError`), a
    checkpoint that cannot continue a run: missing entries, an epoch, position or step that is
    not an integer, a loss sum that is not a number, damaged random-number states, an epoch
    order that is not a permutation (of ``num_train`` datapoints when given), or, given ``vae``,
    model and optimizer states that are not this model's (another run's checkpoint)."""
    def damaged(why: str) -> RunError:
        return RunError(f"{where} is not a usable pyro-vae checkpoint ({why}); it cannot be "
                        "resumed: restore the checkpoint.pt that training wrote, or start a "
                        "new run")

    if not isinstance(checkpoint, dict):
        raise damaged(f"it holds {type(checkpoint).__name__}, not a table")
    missing = [key for key in REQUIRED if key not in checkpoint]
    if missing:
        raise damaged(f"it has no {_names(missing)}")
    for key, least in (("epoch", 1), ("position", 0), ("step", 0)):
        value = checkpoint[key]
        if not _is_int(value) or value < least:
            raise damaged(f"{key} should be an integer ≥ {least}, not {value!r}")
    if not _is_number(checkpoint["loss_sum"]):
        raise damaged(f"loss_sum should be a number, not {checkpoint['loss_sum']!r}")
    rng = checkpoint["rng"]
    if not isinstance(rng, dict):
        raise damaged("its random-number states are not a table")
    streams = [("rng", rng)]
    if "ranks" in rng:
        if not (isinstance(rng["ranks"], list) and rng["ranks"]
                and all(isinstance(r, dict) for r in rng["ranks"])):
            raise damaged("its per-process random-number states are damaged")
        streams += [(f"rng of process {rank}", r) for rank, r in enumerate(rng["ranks"])]
    for label, table in streams:
        for key in ("torch", "order") if label == "rng" else ("torch",):
            if key not in table:
                raise damaged(f"its {label} has no {key!r} random-number state")
            error = _rng_state_error(table[key])
            if error is not None:
                raise damaged(f"its {label} state {key!r} is damaged: {error}")
        if "cuda" in table and not (isinstance(table["cuda"], torch.Tensor)
                                    and table["cuda"].dtype == torch.uint8):
            raise damaged(f"its {label} state 'cuda' is not a byte tensor")
    order = checkpoint["order"]
    if order is not None:
        if not (isinstance(order, torch.Tensor) and order.ndim == 1
                and not order.dtype.is_floating_point and not order.is_complex()
                and order.dtype != torch.bool):
            raise damaged("the epoch's order is not a vector of indices")
        if num_train is not None and len(order) != num_train:
            raise RunError(f"{where} orders {len(order)} training datapoints, and the training "
                           f"data have {num_train}; resume with the data the run was trained on")
        if not torch.equal(order.cpu().sort().values, torch.arange(len(order))):
            raise damaged("the epoch's order is not a permutation")
        if checkpoint["position"] > len(order):
            raise damaged(f"position {checkpoint['position']} is past the epoch's "
                          f"{len(order)} datapoints")
    if not isinstance(checkpoint["model"], dict):
        raise damaged("its model state is not a table")
    error, mismatch = _optimizer_errors(checkpoint["optimizer"], vae)
    if error is not None:
        raise damaged(error)
    if vae is not None:
        model_mismatch = describe_mismatch(vae, checkpoint["model"])
        if model_mismatch is not None:
            mismatch = f"its model state does not fit the run's model: {model_mismatch}"
    if mismatch is not None:
        raise RunError(f"{where} is not this run's checkpoint ({mismatch}); restore the run's "
                       "own checkpoint.pt, or start a new run")
