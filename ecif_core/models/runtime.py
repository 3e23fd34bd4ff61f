"""Process-level numeric settings, applied only around the heavy loops and then restored."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero while inside.

    Trained CLIP towers produce subnormal float32 values in their backward pass on real data;
    x86 CPUs handle those in microcode, which made a training step 9x slower here (0.35 s vs
    0.04 s). Values below 1e-38 carry no information for gradients or influence.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(processes: int = 1) -> int:
    """Torch threads per process when the user gives none: the cores split between processes."""
    return max(1, available_cores() // max(1, processes))


def set_threads(threads: int | None, processes: int = 1) -> int:
    """Set torch's intra-op threads (None = default_threads); returns the number in use.

    torch's own default ignores other processes on the box; on a shared 2-core machine a
    training step took 1755 ms with 2 threads against 106 ms with 1. Only a changed value is
    set: setting even the same value again slowed shards by 25% here."""
    import torch

    wanted = default_threads(processes) if threads is None else max(1, int(threads))
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
    return wanted


def exact_float32() -> None:
    """No TF32 on CUDA: the audit must give the CPU's numbers (1e-4). cuDNN convolutions (the ViT
    patch embedding) use TF32 by default, which moved a CUDA audit's scores by up to 8e-4
    relative on an H100 (bench/RESULTS.md, "GPU")."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


DEVICES = ("auto", "cpu", "cuda")
DEVICE_VARIABLE = "ECIF_DEVICE"  # set by the CLI's --device; read where a model is placed


def model_device() -> "torch.device":
    """The device models run on: ECIF_DEVICE (`--device`) cpu, cuda or auto (default: cuda when
    torch sees a GPU). cuda without a GPU is a ConfigError, never a silent CPU run."""
    import torch

    from ecif_core.errors import ConfigError

    wanted = (os.environ.get(DEVICE_VARIABLE) or "auto").strip().lower()
    if wanted not in DEVICES:
        raise ConfigError("device", f"{wanted!r} is not one of {', '.join(DEVICES)} ({DEVICE_VARIABLE} / --device)")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for (--device / ECIF_DEVICE) but torch sees no CUDA GPU here; "
                                    "use --device cpu or auto")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)
