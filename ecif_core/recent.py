"""A small memo of a process's last few results, keyed by the bytes of the arrays they were computed from:
for a pure, costly function that two callers in one run would otherwise compute twice (calibration's
mixture fit: once to weigh the audited model by a competent reference, once for the estimate)."""
from __future__ import annotations

import hashlib
import threading
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class RecentResults(Generic[T]):
    """The last `kept` results by their inputs. Thread-safe (a threads-pool worker may finalize two audits
    at once); the computation runs outside the lock, so two threads missing at once only compute twice.
    A result is shared between callers: it must be read only."""

    def __init__(self, kept: int = 4):
        self.kept = kept
        self._results: dict[bytes, T] = {}
        self._lock = threading.Lock()

    def get_or_compute(self, inputs: Sequence[np.ndarray], compute: Callable[[], T]) -> T:
        """compute()'s result for these inputs (float64 arrays: shape and bytes), remembered."""
        digest = hashlib.blake2b(digest_size=20)
        for part in inputs:
            array = np.ascontiguousarray(part, dtype=np.float64)
            digest.update(str(array.shape).encode())
            digest.update(memoryview(array).cast("B"))
        key = digest.digest()
        with self._lock:
            found = self._results.get(key)
        if found is None:
            found = compute()
            with self._lock:
                self._results[key] = found
                while len(self._results) > self.kept:
                    self._results.pop(next(iter(self._results)))
        return found

    def clear(self) -> None:
        with self._lock:
            self._results.clear()
