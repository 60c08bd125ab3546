"""FP8 block-scaled checkpoints (DeepSeek-V3 and R1 as published), read as the dense weights
they stand for.

config.json's `quantization_config` says {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [m, n]}; each quantized linear weight is
float8_e4m3fn with a float32 sibling `<name>_scale_inv` of shape [ceil(out/m), ceil(in/n)], and
the weight is `weight * scale_inv` block by block, the last block of a row or column cut short.

The arithmetic is transformers' dequantize path (integrations/finegrained_fp8.py, Fp8Dequantize):
both factors in float32, one product, rounded once to the dtype the model is loaded in (its
config's `dtype`, float32 when it names none). Its blocks follow `weight_block_size`, as
transformers' FP8Linear and DeepSeek's own kernel do. transformers' Fp8Dequantize instead derives
the block from the scale grid (rows // grid rows): the same where the block divides the weight,
and where it does not, a ValueError (transformers 5.25 cannot dequantize the published
DeepSeek-V3 on a CPU: kv_a_proj_with_mqa's 576 rows over 5 scale rows) or, where the grid happens
to divide the weight, blocks of the wrong size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from reference.converters.safetensors_io import Entry
from reference.errors import InputError

SCALE = "_scale_inv"  # a quantized weight's sibling: `<name>_scale_inv`
STORED = torch.float8_e4m3fn
# The quantization_config fields read, and the one value each may have: others change what the
# stored bytes mean (static activation scales, power-of-two scales), so they are refused by name.
FIXED = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "float"}


@dataclass(frozen=True)
class BlockFP8:
    """How a checkpoint's weights are quantized, and the dtype they are read in."""

    block: tuple[int, int]
    dtype: torch.dtype

    def describe(self, count: int) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"dequantized {count} fp8 tensors (block {self.block[0]}x{self.block[1]}) to {dtype}"


def read_fp8(config: Mapping[str, Any], where: str, dtype: torch.dtype | None = None) -> BlockFP8 | None:
    """The FP8 block quantization config.json declares, or None; any other quantization raises.
    The weights are read in `dtype`, else the config's, else float32 (transformers' default)."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise InputError(f"{where}: quantization_config is not a JSON object")
    for key, want in FIXED.items():
        if key in q and q[key] != want:
            raise InputError(f"{where}: quantization_config.{key} is {q[key]!r}; only {want!r} is read "
                             "(FP8 block-scaled weights, as DeepSeek-V3 publishes them)")
    if "quant_method" not in q:
        raise InputError(f"{where}: quantization_config has no quant_method")
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise InputError(f"{where}: quantization_config.weight_block_size is {block!r}, not two positive "
                         "integers (per-tensor FP8 scales are not read)")
    if dtype is not None:
        return BlockFP8((block[0], block[1]), dtype)
    declared = config.get("dtype", config.get("torch_dtype"))
    dtype = getattr(torch, declared, None) if isinstance(declared, str) else None
    if declared is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"{where}: dtype {declared!r} is not a floating dtype to dequantize into")
    return BlockFP8((block[0], block[1]), dtype or torch.float32)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """`weight` (rows, cols) times its block's scale, in float32, rounded once to `dtype`. The
    scales are spread over rows only and broadcast over column blocks, so memory stays at one
    float32 copy of the weight."""
    rows, cols = weight.shape
    x = weight.to(torch.float32)
    s = scale_inv.to(torch.float32).repeat_interleave(block[0], dim=0)[:rows]  # (rows, col blocks)
    full, rest = divmod(cols, block[1])
    x[:, : full * block[1]].unflatten(1, (full, block[1])).mul_(s[:, :full, None])
    if rest:
        x[:, full * block[1]:].mul_(s[:, full:])
    return x.to(dtype)


@dataclass(frozen=True)
class Dequantized:
    """A quantized weight as a reader's entry: its dense shape and dtype, computed when loaded
    (never a byte range to copy)."""

    weight: Entry
    scale: Entry
    fp8: BlockFP8

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.fp8.dtype

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def load(self) -> torch.Tensor:
        return dequantize(self.weight.load(), self.scale.load(), self.fp8.block, self.fp8.dtype)


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a weight: one scale per block, the last block of each axis cut short."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantized(entries: Mapping[str, Entry], fp8: BlockFP8 | None,
                where: str) -> dict[str, Entry | Dequantized]:
    """The checkpoint's tensors with each quantized weight and its scale read as one dense
    weight; a weight without its scale, a scale without its weight, or a scale of the wrong
    shape or dtype raises naming the tensor."""
    scales = {k for k in entries if k.endswith(SCALE)}
    if fp8 is None:
        stray = sorted(scales) or sorted(k for k, e in entries.items() if e.dtype == STORED)
        if stray:
            raise InputError(f"{where}: tensor '{stray[0]}' is FP8-quantized, but config.json has no "
                             "quantization_config")
        return dict(entries)
    out: dict[str, Entry | Dequantized] = {}
    for key, entry in entries.items():
        if key in scales:
            weight = key.removesuffix(SCALE)
            if weight not in entries:
                raise InputError(f"{where}: tensor '{key}' scales '{weight}', which is missing")
            continue
        scale = entries.get(key + SCALE)
        if scale is None:
            if entry.dtype == STORED:
                raise InputError(f"{where}: tensor '{key}' is {STORED} but has no '{key}{SCALE}'")
            out[key] = entry
            continue
        if entry.dtype != STORED or len(entry.shape) != 2:
            raise InputError(f"{where}: tensor '{key}' has a '{SCALE}' but is {entry.dtype} of shape "
                             f"{entry.shape}, not a 2-D {STORED} weight")
        want = grid(entry.shape, fp8.block)
        if scale.dtype != torch.float32 or scale.shape != want:
            raise InputError(f"{where}: tensor '{key}{SCALE}' is {scale.dtype} of shape {scale.shape}; "
                             f"'{key}' {entry.shape} in blocks of {fp8.block[0]}x{fp8.block[1]} needs "
                             f"torch.float32 of shape {want}")
        out[key] = Dequantized(entry, scale, fp8)
    return out
