r"""Memory limits, checked before anything large is allocated.

A request that cannot fit is refused in one line (a :class:`~pyro_vae.errors.ConfigError`)
before it allocates, rather than ending in a traceback or the kernel's out-of-memory kill:

- **Model size.** :func:`check_model_size` (called by :class:`pyro_vae.VAE` before it builds
  anything) counts the parameters of the VAE a configuration describes by building it on
  PyTorch's ``meta`` device, which records shapes and allocates nothing, so the count is exact
  (equal to ``sum(p.numel() for p in vae.parameters())``). Training with Adam holds
  :data:`TRAINING_COPIES` copies of every parameter (the parameter, its gradient, Adam's two
  moments, and the copy a checkpoint writes); a model whose copies and buffers exceed the
  machine's memory, or whose parameters alone exceed the memory free now, is refused.
- **Sample size.** :func:`check_sample_size` refuses ``vae.sample(n)`` (and the image grid or
  array written from it) when it would not fit in the memory free now.
- **Evaluation memory.** :class:`PeakMemory` measures the peak bytes of the tensors a piece of
  code creates; :func:`pyro_vae.evaluation.memory_plan` uses it on a few datapoints to size
  the particle chunks of an evaluation to a memory budget.

Memory is the host's (physical memory, or the cgroup limit of a container when lower) for the
CPU, and the GPU's own (``torch.cuda.mem_get_info``) for a CUDA device.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import math
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.overrides import TorchFunctionMode

from .errors import ConfigError

#: Copies of each parameter that training with Adam holds: the parameter, its gradient, Adam's
#: first and second moments, and the copy a checkpoint writes.
TRAINING_COPIES = 5


# -- how much memory there is ---------------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read_int(path)
        if limit is not None and limit < 2**60:  # v1 writes "unlimited" as a huge number
            return limit
    return None


def _cgroup_free(limit: int) -> int | None:
    """``limit`` less what the cgroup uses, not counting its reclaimable page cache."""
    for usage_path, stat_path, cache_key in (
            ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.stat",
             "total_inactive_file")):
        usage = _read_int(usage_path)
        if usage is None:
            continue
        cache = 0
        with contextlib.suppress(OSError, ValueError):
            for line in Path(stat_path).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
        return max(0, limit - usage + cache)
    return None


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def total_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes of memory of ``device`` (default the CPU): physical memory or the container's
    limit, whichever is lower; a CUDA device's own memory. ``None`` where unknown."""
    device = _device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    if device.type != "cpu":
        return None
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = None
    limit = _cgroup_limit()
    known = [m for m in (physical, limit) if m]
    return min(known) if known else None


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes of memory of ``device`` (default the CPU) free for new allocations now (Linux's
    ``MemAvailable``, within the container's limit; a CUDA device's free memory). ``None``
    where unknown."""
    device = _device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    limit = _cgroup_limit()
    in_cgroup = None if limit is None else _cgroup_free(limit)
    known = [m for m in (free, in_cgroup) if m is not None]
    return min(known) if known else None


def format_bytes(size: float) -> str:
    """``size`` in binary units, 2–3 significant digits: ``"24 GiB"``, ``"1.5 TiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    if unit == "bytes":
        return f"{int(size)} bytes"
    return f"{size:.1f} {unit}" if size < 10 else f"{size:,.0f} {unit}"


def _where(device: torch.device) -> str:
    return "this GPU" if device.type == "cuda" else "this machine"


# -- model size ------------------------------------------------------------------------------------
def _meta_copy(component: Any) -> Any:
    """A private copy of a component object for the meta build (names are left as they are):
    setting it up there must not touch the caller's object. Its tensors are copied to the meta
    device, so the copy costs no memory and still counts them."""
    if isinstance(component, str):
        return component
    memo: dict = {}
    if isinstance(component, torch.nn.Module):
        for tensor in itertools.chain(component.parameters(), component.buffers()):
            meta = tensor.detach().to("meta")
            memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) \
                if isinstance(tensor, torch.nn.Parameter) else meta
    return copy.deepcopy(component, memo)


#: Factory functions that take a size: on the meta device while a VAE is sized, unless the
#: tensor is small (:data:`_SMALL` elements), which Pyro's networks read back (``.item()``) or
#: combine with their index tensors as they are built. ``torch.tensor`` and ``torch.as_tensor``
#: (from data already in memory) stay where they are.
_SIZED_FACTORIES = frozenset(
    getattr(torch, name) for name in (
        "empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint",
        "randperm", "arange", "linspace", "logspace", "eye", "tril_indices", "triu_indices")
    if hasattr(torch, name))
_SMALL = 2**16


def _requested_elements(func, args, kwargs) -> float:
    """The number of elements a factory call asks for (infinite when it cannot be told)."""
    name = getattr(func, "__name__", "")
    try:
        if name in ("arange", "range"):
            bounds = [float(a) for a in args[:3]]
            start, end, step = (0.0, bounds[0], 1.0) if len(bounds) == 1 else \
                (*bounds[:2], bounds[2] if len(bounds) > 2 else float(kwargs.get("step", 1)))
            return max(0.0, (end - start) / step)
        if name in ("linspace", "logspace"):
            return float(args[2] if len(args) > 2 else kwargs["steps"])
        if name == "randperm":
            return float(args[0])
        if name == "eye":
            return float(args[0]) * float(args[1] if len(args) > 1 else args[0])
        if name in ("tril_indices", "triu_indices"):
            return 2.0 * float(args[0]) * float(args[1])
        if name == "randint":
            size = args[-1] if args and not isinstance(args[-1], (int, float)) else kwargs["size"]
        elif name in ("full", "empty_strided"):
            size = args[0] if args else kwargs["size"]
        else:
            size = args[0] if len(args) == 1 and not isinstance(args[0], int) else \
                (args or kwargs["size"])
        return float(math.prod(int(s) for s in size))
    except (KeyError, IndexError, TypeError, ValueError):
        return math.inf


def _tensors(tree):
    """The tensors in nested lists, tuples and dicts (a call's arguments)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _to_meta(tree):
    if isinstance(tree, torch.Tensor):
        return tree if tree.device.type == "meta" else tree.to("meta")
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_to_meta(item) for item in tree)
    if isinstance(tree, dict):
        return {key: _to_meta(item) for key, item in tree.items()}
    return tree


def _triangle_indices(func, args, kwargs) -> torch.Tensor | None:
    """``torch.tril_indices`` / ``triu_indices`` (offset 0) on the meta device, from their
    shape alone: the meta kernel is written in Python, and its first use imports the compiler
    stack (a second and 150 MiB)."""
    try:
        row, col = int(args[0]), int(args[1])
        offset = int(args[2]) if len(args) > 2 else int(kwargs.get("offset", 0))
    except (IndexError, TypeError, ValueError):
        return None
    if offset != 0 or row < 0 or col < 0:
        return None
    if func is torch.triu_indices:
        row, col = col, row  # the upper triangle of row × col has the lower's count of col × row
    count = row * (row + 1) // 2 if row <= col else col * (col + 1) // 2 + (row - col) * col
    return torch.empty((2, count), dtype=kwargs.get("dtype") or torch.long, device="meta")


class _OnMeta(TorchFunctionMode):
    """Tensors made from a size go to the meta device, small ones excepted (see
    :data:`_SIZED_FACTORIES`); an operation on meta and real tensors together (a component's
    dry run on a small real probe) runs on meta copies of the real ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIZED_FACTORIES:
            if kwargs.get("device") is None and _requested_elements(func, args, kwargs) > _SMALL:
                if func in (torch.tril_indices, torch.triu_indices):
                    indices = _triangle_indices(func, args, kwargs)
                    if indices is not None:
                        return indices
                kwargs["device"] = torch.device("meta")
        else:
            devices = {t.device.type == "meta" for t in _tensors((args, kwargs))}
            if len(devices) == 2:
                args, kwargs = _to_meta(args), _to_meta(kwargs)
        return func(*args, **kwargs)


def _meta_vae(config: dict):
    """The VAE of ``config`` built on the meta device (nothing allocated), or ``None`` when a
    component cannot be built there; component objects and a user's network modules are copied
    there first."""
    from . import vae as vae_module

    config = dict(config)
    for key in ("prior", "likelihood", "guide", "encoder", "decoder"):
        if key in config:
            config[key] = _meta_copy(config[key])
    token = vae_module._SIZING.set(True)
    try:
        with torch.random.fork_rng(devices=[]), _OnMeta(), _validation_off():
            return vae_module.VAE(**config)
    except Exception:  # noqa: BLE001 - a component that cannot be built on meta: not counted here
        return None
    finally:
        vae_module._SIZING.reset(token)


@contextlib.contextmanager
def _validation_off():
    import pyro

    with pyro.validation_enabled(False):
        yield


def _meta_networks(config: dict):
    """The encoder and decoder alone, on the meta device (the fallback when a component cannot
    be built there; the networks hold nearly all the parameters of any VAE); a user's network
    module is counted as it is."""
    from .guides import posteriors
    from .models import likelihoods
    from .networks import make_network
    from .registry import resolve

    data_shape = config["data_shape"]
    data_shape = (int(data_shape),) if isinstance(data_shape, int) else tuple(map(int, data_shape))
    data_dim, latent_dim = math.prod(data_shape), int(config.get("latent_dim", 8))
    hidden = tuple(int(h) for h in config.get("hidden", (256, 256)))
    context = int(config.get("num_classes") or 0) if config.get("conditional") else 0
    image_shape = data_shape if len(data_shape) == 3 else None
    try:
        likelihood = resolve("likelihood", likelihoods.LIKELIHOODS,
                             _meta_copy(config.get("likelihood", "bernoulli")),
                             config.get("likelihood_options"), likelihoods.PROTOCOL)
        guide = resolve("guide", posteriors.POSTERIORS, _meta_copy(config.get("guide", "normal")),
                        config.get("guide_options"), posteriors.PROTOCOL)
        networks = []
        with torch.random.fork_rng(devices=[]), _OnMeta():
            for role, inputs, outputs in (
                    ("decoder", latent_dim, likelihood.decoder_outputs(data_dim)),
                    ("encoder", data_dim, guide.encoder_outputs(latent_dim))):
                kind = config.get(role, "mlp")
                networks.append(kind if isinstance(kind, torch.nn.Module) else make_network(
                    kind, inputs, outputs, hidden, role=role, image_shape=image_shape,
                    context_features=context))
        return networks
    except Exception:  # noqa: BLE001 - the real build reports what is wrong with the config
        return None


def model_size(data_shape: int | Sequence[int], latent_dim: int = 8, **options) -> dict | None:
    """The size of the :class:`pyro_vae.VAE` that ``VAE(data_shape, latent_dim, **options)``
    would build, found by building it on the meta device (nothing is allocated):
    ``{"parameters": int, "parameter_bytes": int, "buffer_bytes": int, "exact": bool}``.

    ``exact`` is false when a component could not be built on the meta device and only the
    encoder and decoder networks were counted; ``None`` when not even they could be (an invalid
    configuration, which the real build reports)."""
    config = {"data_shape": data_shape, "latent_dim": latent_dim, **options}
    modules, exact = _meta_vae(config), True
    if modules is None:
        modules, exact = _meta_networks(config), False
        if modules is None:
            return None
    else:
        modules = [modules]
    parameters = [p for module in modules for p in module.parameters()]
    buffers = [b for module in modules for b in module.buffers()]
    return {"parameters": sum(p.numel() for p in parameters),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in parameters),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
            "exact": exact}


def parameter_count(data_shape: int | Sequence[int], latent_dim: int = 8, **options) -> int:
    """The number of parameters of ``VAE(data_shape, latent_dim, **options)``, without building
    it (see :func:`model_size`)."""
    size = model_size(data_shape, latent_dim, **options)
    if size is None:
        raise ConfigError("this VAE configuration cannot be built")
    return size["parameters"]


def training_bytes(size: dict) -> int:
    """Bytes training with Adam holds for a model of :func:`model_size` ``size``: every
    parameter :data:`TRAINING_COPIES` times, and the buffers once."""
    return TRAINING_COPIES * size["parameter_bytes"] + size["buffer_bytes"]


def check_model_size(data_shape: int | Sequence[int], latent_dim: int = 8, *,
                     device: torch.device | str | None = None, **options) -> dict | None:
    """Refuse, in one line, a VAE too large for ``device`` (default the CPU, where a VAE is
    built) before anything is allocated: one whose training memory (:func:`training_bytes`)
    exceeds the device's total memory, or whose parameters and buffers exceed the memory free
    now. Returns :func:`model_size`'s answer."""
    size = model_size(data_shape, latent_dim, **options)
    if size is None:
        return None
    device = _device(device)
    needed, built = training_bytes(size), size["parameter_bytes"] + size["buffer_bytes"]
    total, free = total_memory(device), available_memory(device)
    what = (f"the model would have {size['parameters']:,} parameters "
            f"(about {format_bytes(needed)} to train with Adam)")
    if total is not None and needed > total:
        raise ConfigError(f"{what}; {_where(device)} has {format_bytes(total)}")
    if free is not None and built > free:
        raise ConfigError(f"{what}, {format_bytes(built)} to build; {_where(device)} has "
                          f"{format_bytes(free)} free")
    return size


# -- measuring the memory a computation needs ------------------------------------------------------
def _storages(tree, into: set) -> None:
    for tensor in _tensors(tree):
        with contextlib.suppress(RuntimeError, NotImplementedError):
            into.add(id(tensor.untyped_storage()))


class PeakMemory(TorchFunctionMode):
    """Within ``with PeakMemory() as memory:``, the bytes held by the tensors created there,
    live (:attr:`live`) and at the peak (:attr:`peak`).

    Every torch function's result is tracked from its storage's allocation to its release
    (through a finalizer on the storage); views and in-place results of tensors are not new
    memory and are not counted, nor are tensors on the meta device. What a single operator
    allocates and frees internally is not seen, so a measurement is of the tensors the code
    holds, not of the allocator. The garbage collector is paused while it measures, so the
    figures are the same on every run (tensors freed by reference counting only)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._gc_was_enabled = False

    def __enter__(self):
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._gc_was_enabled:
                gc.enable()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            outputs = [result]
        elif isinstance(result, (tuple, list)):
            outputs = [r for r in result if isinstance(r, torch.Tensor)]
        else:
            outputs = []
        if outputs:
            inputs: set[int] = set()
            _storages(args, inputs)
            _storages(kwargs, inputs)
            for tensor in outputs:
                self._track(tensor, inputs)
        return result

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return
        key = id(storage)
        if key in self._sizes or key in inputs:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


_LIBC: Any = None


def release_free_memory() -> None:
    """Free what a loop of large, short-lived tensors leaves behind: tensors held by reference
    cycles (Pyro's transforms and their inverses reference each other and cache their last
    input and output), which only the garbage collector frees, then the memory the C allocator
    keeps after they are freed (glibc's ``malloc_trim``; glibc serves allocations below its
    adaptive threshold, up to 32 MiB, from heaps it keeps and fragments)."""
    global _LIBC
    gc.collect(1)  # the young generations: what the last chunk left (a full pass costs ~0.1 s)
    if _LIBC is None:
        _LIBC = False
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC = libc
    if _LIBC:
        _LIBC.malloc_trim(0)


def measure_peak(function, *args, **kwargs) -> int:
    """The peak bytes of the tensors ``function(*args, **kwargs)`` creates (:class:`PeakMemory`),
    its result dropped."""
    with PeakMemory() as memory:
        function(*args, **kwargs)
    return memory.peak


# -- sample size -----------------------------------------------------------------------------------
def _image_bytes_per_sample(data_shape: Sequence[int]) -> int:
    """Bytes per sample of the image grid ``plots.save_grid`` writes: the clamped images, the
    upscaled ones, the 3-channel float grid and its scaled copy, then 8-bit copies (tensor and
    PIL image)."""
    shape = tuple(data_shape)
    channels, height, width = (shape if len(shape) == 3 else
                               (1, 1, shape[0]) if len(shape) == 1 else (1, *shape[-2:]))
    factor = max(1, 32 // width) if width < 32 and height > 1 else 1
    upscaled = channels * height * factor * width * factor
    cell = (height * factor + 2) * (width * factor + 2)  # one grid cell, padding included
    return 4 * (channels * height * width + upscaled + 2 * 3 * cell) + 2 * 3 * cell


def _sample_needs(vae, n: int, image: bool) -> tuple[int, int]:
    """Bytes ``n`` samples need on the VAE's device (the tensors of ``vae.sample``, measured on
    2 and 4 samples outside the caller's random stream and scaled to ``n``) and on the host
    (the samples copied there, and the image grid or the NumPy copy written from them)."""
    device = vae.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.no_grad():
        small, large = (measure_peak(vae.sample, k) for k in (2, 4))
    per_sample = max((large - small) / 2, large / 4)
    fixed = max(0.0, small - 2 * per_sample)
    written = _image_bytes_per_sample(vae.data_shape) if image else 4 * vae.data_dim
    host = n * written + (0 if device.type == "cpu" else n * 4 * vae.data_dim)
    return int(fixed + n * per_sample), int(host)


def sample_bytes(vae, n: int, *, image: bool = True) -> int:
    """Bytes ``vae.sample(n)`` and writing its result hold at the peak, device and host
    together: the tensors of ``vae.sample`` (measured per sample with :class:`PeakMemory` and
    scaled to ``n``), plus the image grid (``image``) or the NumPy copy of the samples."""
    return sum(_sample_needs(vae, n, image))


def check_sample_size(vae, n: int, *, image: bool = True) -> int:
    """Refuse, in one line, ``n`` samples of ``vae`` that would not fit in the memory free now
    (:func:`sample_bytes`; ``image``: written as an image grid, else as an array): on the VAE's
    device and on the host. Returns the estimate in bytes."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of samples must be a positive integer, not {n!r}")
    on_device, on_host = _sample_needs(vae, n, image)
    device = vae.device
    checks = [(on_device + on_host, device)] if device.type == "cpu" else \
        [(on_device, device), (on_host, torch.device("cpu"))]
    for needed, where in checks:
        free = available_memory(where)
        if free is not None and needed > free:
            raise ConfigError(f"{n:,} samples would need about {format_bytes(needed)} "
                              f"({n:,} × {vae.data_dim:,} values, the decoder's activations"
                              f"{' and the image grid' if image else ''}); {_where(where)} has "
                              f"{format_bytes(free)} free")
    return on_device + on_host
