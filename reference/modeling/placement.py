"""Which device each block goes to when a model is spread over several: a pure function.

Blocks go in contiguous runs, in device order, sized in proportion to `weights` (equal by
default): device i ends at block round(L * (w_0 + ... + w_i) / sum(w)), so the sizes add up to L
exactly and no run is split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def plan(num_layers: int, num_devices: int, weights: Sequence[float] | None = None) -> list[int]:
    """The device index of each of `num_layers` blocks (non-decreasing, 0 .. num_devices - 1)."""
    if num_devices < 1:
        raise ValueError("set_device: name at least one device")
    weights = [1.0] * num_devices if weights is None else [float(w) for w in weights]
    if len(weights) != num_devices:
        raise ValueError(f"set_device: {len(weights)} weights for {num_devices} devices")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"set_device: weights must be finite, non-negative and not all zero, not {weights}")
    total, cumulative, ends = sum(weights), 0.0, []
    for w in weights:
        cumulative += w
        ends.append(math.floor(num_layers * cumulative / total + 0.5))  # half up, not to even
    ends[-1] = num_layers  # a float sum that falls short must not drop the last block
    out: list[int] = []
    for device, end in enumerate(ends):
        out.extend([device] * (end - len(out)))
    return out
