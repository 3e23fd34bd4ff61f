"""Kernel densities on a grid, as the calibration's mixture fit reads its components (ecif_core.calibration)."""
from __future__ import annotations

import numpy as np


def kernel_density(sample: np.ndarray, grid: np.ndarray, kernel_width: float = 1.0) -> np.ndarray:
    """Gaussian kernel density on the grid (kernel_width x Silverman's bandwidth on the robust spread)."""
    sample = sample[np.isfinite(sample)]
    if len(sample) > 20000:
        sample = np.random.default_rng(0).choice(sample, 20000, replace=False)
    width = max(kernel_width * 1.06 * robust_sd(sample) * len(sample) ** -0.2, 1e-6)
    step = grid[1] - grid[0]
    hist, _ = np.histogram(sample, bins=len(grid), range=(grid[0] - step / 2, grid[-1] + step / 2))
    offsets = np.arange(-len(grid) + 1, len(grid)) * step
    kernel = np.exp(-0.5 * (offsets / width) ** 2)
    density = _convolve(hist, kernel)
    return density / (density.sum() * step)


def _convolve(hist: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    full = np.convolve(hist.astype(np.float64), kernel)
    start = (len(kernel) - 1) // 2
    return full[start:start + len(hist)]


def robust_sd(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of the finite values (the SD under normality); the SD, or 1,
    where half the values are equal."""
    values = values[np.isfinite(values)]
    mad = 1.4826 * np.median(np.abs(values - np.median(values)))
    return float(mad if mad > 0 else (np.std(values) or 1.0))
