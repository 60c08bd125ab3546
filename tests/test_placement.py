"""reference.modeling.placement.plan: contiguous runs of blocks, sized by weights."""

from __future__ import annotations

import pytest

from reference.modeling.placement import plan


@pytest.mark.parametrize(("layers", "devices", "weights", "want"), [
    (4, 2, None, [0, 0, 1, 1]),
    (5, 2, None, [0, 0, 0, 1, 1]),  # 2.5 rounds half up
    (10, 3, None, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]),
    (6, 2, [1, 2], [0, 0, 1, 1, 1, 1]),
    (6, 3, [0, 1, 1], [1, 1, 1, 2, 2, 2]),  # a weight of 0: no block, the device still listed
    (2, 4, None, [0, 2]),  # more devices than blocks
    (3, 1, None, [0, 0, 0]),
    (0, 2, None, []),
])
def test_plan(layers: int, devices: int, weights: list[float] | None, want: list[int]) -> None:
    assert plan(layers, devices, weights) == want


@pytest.mark.parametrize("layers", range(0, 40, 7))
@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 1, 1], [0.1, 0.7, 0.2], [1e-9, 1, 1e9]])
def test_plan_is_contiguous_complete_and_proportional(layers: int, weights: list[float]) -> None:
    got = plan(layers, len(weights), weights)
    assert len(got) == layers and got == sorted(got)
    for device, w in enumerate(weights):
        share = layers * w / sum(weights)
        assert abs(got.count(device) - share) <= 1  # each run within one block of its share


@pytest.mark.parametrize(("devices", "weights"), [(0, None), (2, [1]), (2, [1, -1]), (2, [0, 0]),
                                                  (2, [1, float("nan")])])
def test_plan_refuses_what_cannot_be_placed(devices: int, weights: list[float] | None) -> None:
    with pytest.raises(ValueError, match="set_device"):
        plan(4, devices, weights)
