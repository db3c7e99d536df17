r"""Networks shared by encoders (``pyro_vae.guides``) and decoders (``pyro_vae.models``).

A network maps a flat input ``[..., in_features]`` to a flat output ``[..., out_features]`` and
accepts any number of leading batch dimensions (particles, data), so the same decoder serves one
sample of :math:`z` or K vectorized particles. An optional ``context`` ``[..., context_features]``
(a one-hot label for conditional VAEs) is broadcast against the input's leading dimensions and
joins the input (:func:`join_context`).

Decoder outputs are laid out as :math:`k` blocks of ``data_dim`` numbers (block-major), one block
per parameter of the likelihood; the ``conv`` decoder emits its :math:`k \cdot C` channels in that
order.

**Your own network.** Any ``nn.Module`` can be the encoder or the decoder of
:class:`pyro_vae.VAE` in place of a name of :data:`NETWORKS`. The VAE calls it as
``net(inputs, context)`` and relies on this contract:

- encoder: ``inputs`` is ``x`` ``[batch, data_dim]``; it returns
  ``[batch, guide.encoder_outputs(latent_dim)]``, the numbers that parameterize the guide family;
- decoder: ``inputs`` is ``z`` ``[..., latent_dim]`` with any leading dimensions (particles,
  data); it returns ``[..., likelihood.decoder_outputs(data_dim)]`` with the same leading
  dimensions, in the likelihood's blocks as above;
- ``context`` is ``None`` for an unconditional VAE; for a conditional one it is the one-hot label
  ``[batch, num_classes]``, which a decoder broadcasts against the leading dimensions of ``z``
  (:func:`join_context` broadcasts and appends it). A module whose ``forward`` takes one argument serves an
  unconditional VAE (wrapped in :class:`ContextFree`) and is refused by a conditional one.

The VAE passes zeros through a user's network once, when it is built: ``x`` ``[2, data_dim]``
through an encoder, ``z`` ``[2, latent_dim]`` and ``[3, 2, latent_dim]`` through a decoder
(without gradients, in eval mode, the global random state untouched), and refuses, in one line
that names the network, an output that is not a tensor of the expected shape (:func:`probe`).

A run records a user's network as ``{"class": "module:QualName", "options": net.config}`` when its
class can be imported by name (not defined in ``__main__`` or inside a function) and it has a
``config`` dict of the keyword arguments that rebuild it, ``cls(**options)``
(:func:`network_entry`, :func:`rebuild_network`); otherwise as
``{"class": "module:QualName", "rebuildable": false}``, and such a run is restored with
``load_run(run_dir, model=...)``.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import sys
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .lvm import class_path, find_class

#: The network kinds (``encoder=`` / ``decoder=`` of :class:`pyro_vae.VAE`).
NETWORKS = ("mlp", "linear", "conv")
#: The activations of the hidden layers of ``mlp`` networks (``activation=`` of
#: :class:`pyro_vae.VAE`); ``tanh`` is the architecture of Burda et al. (2016).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "gelu": nn.GELU,
    "silu": nn.SiLU, "leaky-relu": nn.LeakyReLU,
}


def activation_class(name: str) -> type[nn.Module]:
    """The module class of the activation ``name`` (:data:`ACTIVATIONS`), or one line."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown activation {name!r}; choose one of: "
                          f"{', '.join(ACTIVATIONS)}") from None


def join_context(inputs: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """``inputs`` ``[..., n]`` with ``context`` ``[..., c]`` (broadcast against the inputs' leading
    dimensions) appended: ``[..., n + c]``; ``inputs`` alone when ``context`` is ``None``."""
    if context is None:
        return inputs
    context = context.expand(*inputs.shape[:-1], context.shape[-1])
    return torch.cat([inputs, context], dim=-1)


class MLP(nn.Module):
    """Fully connected network: Linear → activation → … → Linear (no output activation)."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (256, 256),
                 activation: type[nn.Module] = nn.ReLU, context_features: int = 0):
        super().__init__()
        sizes = [in_features + context_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(join_context(inputs, context))


class LinearNet(nn.Module):
    """A single affine map; with a Normal likelihood this makes the model probabilistic PCA."""

    def __init__(self, in_features: int, out_features: int, context_features: int = 0):
        super().__init__()
        self.linear = nn.Linear(in_features + context_features, out_features)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(join_context(inputs, context))


def _check_image(image_shape: Sequence[int] | None, role: str) -> tuple[int, int, int]:
    if image_shape is None or len(image_shape) != 3:
        raise ConfigError(f"a conv {role} needs image data of shape C×H×W (such as digits or "
                          f"MNIST), not data of shape {tuple(image_shape or ())}; use mlp")
    channels, height, width = (int(s) for s in image_shape)
    if height < 4 or width < 4:
        raise ConfigError(f"a conv {role} needs images of at least 4×4, not {height}×{width}")
    return channels, height, width


class ConvEncoder(nn.Module):
    r"""Two stride-2 convolutions (32, 64 channels) then an MLP head on the flattened features.

    Input ``[..., C*H*W]`` (flattened images); 8×8 digits give :math:`2 \times 2 \times 64`
    features, 28×28 MNIST :math:`7 \times 7 \times 64`.
    """

    def __init__(self, image_shape: Sequence[int], out_features: int,
                 hidden: Sequence[int] = (256,), context_features: int = 0):
        super().__init__()
        self.image_shape = _check_image(image_shape, "encoder")
        channels = self.image_shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        )
        with torch.no_grad():
            features = self.conv(torch.zeros(1, *self.image_shape)).numel()
        self.head = MLP(features, out_features, hidden[:1] or (256,),
                        context_features=context_features)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        lead = inputs.shape[:-1]
        features = self.conv(inputs.reshape(-1, *self.image_shape)).flatten(1)
        return self.head(features.reshape(*lead, -1), context)


class ConvDecoder(nn.Module):
    r"""An MLP to a :math:`64 \times \lceil H/4 \rceil \times \lceil W/4 \rceil` feature map, then
    two stride-2 transposed convolutions to :math:`k \cdot C` channels at :math:`H \times W`
    (cropped where :math:`H` or :math:`W` is not a multiple of 4)."""

    def __init__(self, in_features: int, image_shape: Sequence[int], out_features: int,
                 hidden: Sequence[int] = (256,), context_features: int = 0):
        super().__init__()
        self.image_shape = _check_image(image_shape, "decoder")
        channels, height, width = self.image_shape
        data_dim = channels * height * width
        if out_features % data_dim:
            raise ConfigError(f"a conv decoder emits whole blocks of {data_dim}, "
                              f"not {out_features} numbers")
        self.blocks = out_features // data_dim
        self.grid = (math.ceil(height / 4), math.ceil(width / 4))
        self.head = MLP(in_features, 64 * self.grid[0] * self.grid[1], hidden[:1] or (256,),
                        context_features=context_features)
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, self.blocks * channels, 4, stride=2, padding=1),
        )

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        lead = inputs.shape[:-1]
        _, height, width = self.image_shape
        features = self.head(inputs, context).reshape(-1, 64, *self.grid)
        images = self.deconv(features)[..., :height, :width]
        return images.reshape(*lead, -1)


def make_network(kind: str, in_features: int, out_features: int,
                 hidden: Sequence[int] = (256, 256), *, role: str = "encoder",
                 image_shape: Sequence[int] | None = None, context_features: int = 0,
                 activation: str = "relu") -> nn.Module:
    """Build the ``role`` (``encoder`` or ``decoder``) network named ``kind`` (:data:`NETWORKS`).

    ``image_shape`` is the data's C×H×W shape, needed by ``conv``; ``activation`` (a name of
    :data:`ACTIVATIONS`) is that of the hidden layers of ``mlp``.
    """
    if kind == "mlp":
        return MLP(in_features, out_features, hidden, activation=activation_class(activation),
                   context_features=context_features)
    if kind == "linear":
        return LinearNet(in_features, out_features, context_features=context_features)
    if kind == "conv":
        if role == "encoder":
            return ConvEncoder(image_shape, out_features, hidden, context_features)
        return ConvDecoder(in_features, image_shape, out_features, hidden, context_features)
    raise ConfigError(f"unknown network {kind!r}; choose one of: {', '.join(NETWORKS)}")


# -- a user's network ------------------------------------------------------------------------------
class ContextFree(nn.Module):
    """A one-argument network ``module(inputs)`` called as the VAE calls its networks,
    ``(inputs, context)``, in an unconditional VAE (``context`` is always ``None`` there)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(inputs)


def user_module(net: nn.Module) -> nn.Module:
    """The user's own module (unwrapped from :class:`ContextFree`)."""
    return net.module if isinstance(net, ContextFree) else net


def takes_context(net: nn.Module) -> bool:
    """Whether ``net.forward`` accepts a second positional argument (the context); one whose
    signature cannot be read is taken at its word."""
    try:
        signature = inspect.signature(net.forward)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(None, None)
    except TypeError:
        return False
    return True


def as_network(net: nn.Module, role: str, conditional: bool) -> nn.Module:
    """A user's module ready to be called as ``net(inputs, context)``: as it is when its
    ``forward`` takes the context; when it does not, wrapped in :class:`ContextFree` in an
    unconditional VAE (its parameters then sit under ``module.`` in the VAE's state dict) and
    refused, in one line, in a conditional VAE."""
    if takes_context(net):
        return net
    if conditional:
        raise ConfigError(f"the {role} {type(net).__name__} takes no context (its forward has one "
                          f"argument); a conditional VAE calls it as {role}(inputs, context) with "
                          "the one-hot labels")
    return ContextFree(net)


def _device_dtype(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in itertools.chain(net.parameters(), net.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _shape(tensor_shape) -> str:
    return f"[{', '.join(str(int(s)) for s in tensor_shape)}]"


def probe(net: nn.Module, role: str, inputs_shape: Sequence[int], expected: Sequence[int],
          context_features: int = 0, *, inputs_name: str = "inputs", need: str = "") -> None:
    """Pass zeros of ``inputs_shape`` (with a one-hot context ``[inputs_shape[-2],
    context_features]`` when ``context_features`` > 0) through ``net`` once and refuse, in one
    line, an output that is not a tensor of shape ``expected``; ``need`` says where that shape
    comes from.

    It runs without gradients, in eval mode (a batch-norm layer keeps its running statistics)
    and with the global random state restored afterwards."""
    name = type(user_module(net)).__name__
    device, dtype = _device_dtype(net)
    inputs = torch.zeros(*inputs_shape, device=device, dtype=dtype)
    context = None
    if context_features:
        context = torch.zeros(inputs_shape[-2], context_features, device=device, dtype=dtype)
        context[:, 0] = 1
    called = f"{inputs_name} of shape {_shape(inputs_shape)}"
    modes = {module: module.training for module in net.modules()}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            net.eval()
            output = net(inputs, context)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the user's network raises, in one line
        text = str(exc).strip().splitlines()
        raise ConfigError(f"the {role} {name} fails on {called}: "
                          f"{text[0] if text else type(exc).__name__}") from None
    finally:
        for module, training in modes.items():
            module.training = training
    expected_text = f"expected a tensor of shape {_shape(expected)}{need}"
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"the {role} {name} returned {type(output).__name__} for {called}; "
                          f"{expected_text}")
    if tuple(output.shape) != tuple(expected):
        raise ConfigError(f"the {role} {name} returned shape {_shape(output.shape)} for {called}; "
                          f"{expected_text}")


def _importable(cls: type) -> bool:
    """Whether ``cls`` is found again by importing its module and following its qualified name."""
    if cls.__module__ in ("__main__", "builtins") or "<locals>" in cls.__qualname__:
        return False
    target: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is cls


def network_entry(net: nn.Module) -> dict[str, Any]:
    """How a run records a user's network: ``{"class": "module:QualName", "options": config}``
    when its class is importable and ``net.config`` is a JSON-serializable dict, else
    ``{"class": "module:QualName", "rebuildable": false}``."""
    module = user_module(net)
    cls = type(module)
    entry: dict[str, Any] = {"class": class_path(cls)}
    try:
        options = getattr(module, "config", None)
    except Exception:  # noqa: BLE001 - a config property that fails: not rebuildable
        options = None
    if isinstance(options, dict) and _importable(cls):
        try:
            entry["options"] = json.loads(json.dumps(options, allow_nan=False))
            return entry
        except (TypeError, ValueError):
            pass
    entry["rebuildable"] = False
    return entry


def rebuild_network(entry: Any, role: str = "encoder") -> nn.Module:
    """The network a :func:`network_entry` describes, ``cls(**options)``, with fresh parameters;
    one line when it cannot be rebuilt."""
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
        raise ConfigError(f"the {role} must be a network name ({', '.join(NETWORKS)}) or a table "
                          f"with a 'class', not {entry!r}")
    path = entry["class"]
    options = entry.get("options")
    if entry.get("rebuildable", True) is False or "options" not in entry:
        raise ConfigError(f"the {role} network {path} cannot be rebuilt from the config; load the "
                          "run with load_run(run_dir, model=...)")
    if not isinstance(options, dict):
        raise ConfigError(f"the options of the {role} network {path} are not a table")
    target = find_class(path, f"{role} network class")
    if not issubclass(target, nn.Module):
        raise ConfigError(f"{path} is not an nn.Module class (the {role} network)")
    try:
        return target(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for the {role} network {path}: {exc}") from None
