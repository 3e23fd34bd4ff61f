"""Process-level numeric settings, applied only around the heavy loops and then restored."""
from __future__ import annotations

import contextlib
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
