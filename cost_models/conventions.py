"""Conventions every cost figure shares, measured or predicted: how many bytes a collective moves over the bus
per byte of its buffer, and how many bytes one element of a precision takes. Pure Python, so the cost model
can price without importing torch."""
from __future__ import annotations

from collections.abc import Callable

# nccl-tests' bus bandwidth: busbw = algbw x factor(group size), so one busbw describes a link for every op
BUS_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "send_recv": lambda n: 1.0,
}
# bytes per device per byte of buffer for every op pase counts (``pase.runtime.comm_count``): the calibrated ops
# above, and the re-layouts' all-to-all (each device sends all but its own part)
MOVED_FACTOR: dict[str, Callable[[int], float]] = {**BUS_FACTOR, "all_to_all": lambda n: (n - 1) / n,
                                                   "broadcast": lambda n: (n - 1) / n}


def bytes_per_element(precision: str, full: int = 4) -> int:
    """Bytes per element of an activation under ``precision``: 2 under bf16 or fp16, else ``full`` (fp32, or a
    tensor's captured element size)."""
    return 2 if precision in ("bf16", "fp16") else full

