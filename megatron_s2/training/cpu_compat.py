"""Run ``megatron.training.pretrain()`` on a machine without a GPU.

This is for smoke tests, CI and demos only: training on CPU is slow (a tiny model takes seconds per
step). ``pretrain_gpt_s2.py`` and ``examples/generate_sample.py`` switch it on when no CUDA device
exists (``MEGATRON_S2_CPU=1`` forces it on, ``=0`` off) and it announces itself in the log.

megatron-core 0.19.2 assumes CUDA in dozens of places (``device='cuda'``, ``.cuda()``,
``torch.cuda.current_device()``, streams, events, memory statistics, CUDA RNG states). Patching each
call site would break on every upgrade, so this module redirects them globally instead:

1. a ``TorchFunctionMode`` rewrites every CUDA device argument (``'cuda'``, ``'cuda:N'``, an int, a
   ``torch.device``) to CPU and makes ``Tensor.cuda()``, ``Tensor.pin_memory()`` and
   ``pin_memory=True`` no-ops;
2. the ``torch.cuda`` functions Megatron calls (streams, events, synchronize, memory statistics, RNG
   state) are replaced with CPU stand-ins, for the rest of the process;
3. Megatron's start-up gets ``allow_no_cuda=True``, and its JIT warm-up (which runs fused kernels on
   random data and so shifts the CPU random stream, making initialisation depend on the TP size) is
   skipped;
4. torch.cuda's RNG functions act on a CPU generator, so Megatron's RNG tracker, and the RNG
   states it saves in checkpoints, work as on a GPU.

Distributed runs use the gloo backend; ``apply_cpu_arguments`` sets it together with the arguments
a CPU run needs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
import warnings

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["cpu_mode_requested", "activate", "apply_cpu_arguments"]

_ACTIVE_MODE: "_CpuDeviceMode | None" = None

BANNER = (
    "megatron_s2: running on CPU through megatron_s2.training.cpu_compat (no CUDA device, or "
    "MEGATRON_S2_CPU=1). This is SLOW and meant for tests and demos only."
)


def cpu_mode_requested() -> bool:
    """True when the run should use the CPU layer: MEGATRON_S2_CPU=1 (or true/yes), or no GPU and
    MEGATRON_S2_CPU not set to 0 (or false/no)."""
    flag = os.environ.get("MEGATRON_S2_CPU", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return not torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare int means a CUDA ordinal in torch's factories
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """Sends every tensor that code puts on CUDA to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts e.g. grad.type() == 'torch.cuda.FloatTensor': CPU tensors play CUDA.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # pinning needs a CUDA driver; pageable memory is the same here
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _Stream:
    """CPU stand-in for ``torch.cuda.Stream``: everything is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


class _Event:
    """CPU stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


# Answers Megatron's architecture checks (compute capability 0.0: no Hopper/Blackwell features).
_CPU_DEVICE_PROPERTIES = types.SimpleNamespace(name="cpu", major=0, minor=0, multi_processor_count=1,
                                               total_memory=0)


def _constant(value):
    """A new function returning ``value``: torch._dynamo keys rules on function identity, so two
    torch.cuda attributes must never share one stand-in object."""

    def stand_in(*args, **kwargs):
        return value

    return stand_in


def _cuda_stand_ins() -> dict:
    """The torch.cuda attributes Megatron's training path touches, as CPU stand-ins."""
    return {
        # Megatron sets up its parallel groups only when it sees a device; one "device" per rank.
        "device_count": _constant(1),
        "current_device": _constant(0),
        "set_device": _constant(None),
        "synchronize": _constant(None),
        "empty_cache": _constant(None),
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda device=None: _Stream(),
        "default_stream": lambda device=None: _Stream(),
        "set_stream": _constant(None),
        "stream": lambda stream=None: contextlib.nullcontext(),
        "memory_allocated": _constant(0),
        "max_memory_allocated": _constant(0),
        "memory_reserved": _constant(0),
        "max_memory_reserved": _constant(0),
        "reset_peak_memory_stats": _constant(None),
        "memory_stats": lambda device=None: {},
        "get_device_properties": lambda device=None: _CPU_DEVICE_PROPERTIES,
        "get_device_capability": lambda device=None: (0, 0),
        "get_device_name": lambda device=None: "cpu",
    }


def _cuda_rng_stand_ins() -> dict:
    """torch.cuda's RNG functions backed by one CPU generator that stands for the device's.

    Megatron's own RNG tracker then works unchanged: it seeds per-TP-rank states, saves them in
    checkpoints and restores them on resume. Tensors "on the device" are CPU tensors drawing from
    the global CPU generator, which Megatron saves and restores as well.
    """
    generator = torch.Generator()

    def get_rng_state(device="cuda"):
        return generator.get_state()

    def set_rng_state(new_state, device="cuda"):
        generator.set_state(new_state)

    def manual_seed(seed):
        generator.manual_seed(int(seed))

    def manual_seed_all(seed):
        generator.manual_seed(int(seed))

    return {"get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
            "manual_seed": manual_seed, "manual_seed_all": manual_seed_all}


def _patch_megatron_start_up() -> None:
    import megatron.training.initialize as mt_initialize
    import megatron.training.training as mt_training

    if not getattr(mt_training.initialize_megatron, "_megatron_s2_cpu", False):
        wrapped = functools.partial(mt_training.initialize_megatron, allow_no_cuda=True)
        wrapped._megatron_s2_cpu = True
        mt_training.initialize_megatron = wrapped
    # The warm-up runs fused kernels on random inputs: on CPU it only shifts the random stream.
    mt_training.set_jit_fusion_options = _constant(None)
    mt_initialize.set_jit_fusion_options = _constant(None)


def activate() -> None:
    """Switch this process to CPU mode (idempotent). Call before megatron.training starts."""
    global _ACTIVE_MODE
    if _ACTIVE_MODE is not None:
        return
    for name, stand_in in _cuda_stand_ins().items():
        setattr(torch.cuda, name, stand_in)
    for name, stand_in in _cuda_rng_stand_ins().items():
        setattr(torch.cuda, name, stand_in)
        setattr(torch.cuda.random, name, stand_in)
    # Megatron's pin_memory=True data loaders only warn on CPU; the warning is noise here.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    _patch_megatron_start_up()
    # Megatron requires this for TP/CP > 1 on pre-Blackwell devices; on CPU it changes nothing.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    mode = _CpuDeviceMode()
    mode.__enter__()  # stays pushed for the life of the process
    _ACTIVE_MODE = mode
    if int(os.environ.get("RANK", "0")) == 0:
        print(BANNER, flush=True)


def apply_cpu_arguments(args) -> None:
    """Adjust parsed Megatron arguments for a CPU run (gloo, CPU initialisation, fp32)."""
    args.distributed_backend = "gloo"
    args.use_cpu_initialization = True
    # Mixed precision kernels and fused optimizers are CUDA-only; fp32 keeps CPU runs exact.
    if args.bf16 or args.fp16:
        warnings.warn("megatron_s2 CPU mode: --bf16/--fp16 ignored, training in float32.")
        args.bf16 = args.fp16 = False
        args.params_dtype = torch.float32
