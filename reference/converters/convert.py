"""HF family -> HF family through the canonical description, streamed and atomic."""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reference.converters.files import atomic_dir, side_files
from reference.converters.hf_dir import open_hf
from reference.converters.plan import adapt, plan_target, read_canonical
from reference.converters.safetensors_io import write_dir
from reference.errors import ReferenceError
from reference.families.config import PASSTHROUGH
from reference.families.registry import family_named

DEFAULT_SHARD_BYTES = 5 * 2**30
RECORD = "conversion.json"  # what was done, beside the weights: source, caveats, folds


@dataclass
class Report:
    """What a conversion did, for the CLI to print and for DST/conversion.json."""

    source: str
    target: str
    tensors: int = 0
    bytes: int = 0
    caveats: list[str] = field(default_factory=list)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A torch floating dtype from its name (`bf16`, `bfloat16`, `float32`, ...)."""
    if name is None:
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ReferenceError(f"--dtype: '{name}' is not a floating dtype (try bfloat16, float16, float32)")
    return dtype


def validate_config(config: dict, target: str) -> None:
    """Let transformers' own config class judge the target config before anything is written."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    try:
        AutoConfig.for_model(config["model_type"], **fields)
    except Exception as e:  # transformers raises several types; its message names the field
        reason = str(e).strip().splitlines()[-1].strip()
        raise ReferenceError(f"{target}: transformers rejects the converted config: {reason}") from None


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    dtype: str | None = None,
    force: bool = False,
    allow: Collection[str] = (),
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Report:
    """Convert the HF model at SRC into family `to` at DST; DST appears whole or not at all.

    `allow` names features the user accepts dropping (e.g. `sliding_window`); each one is
    recorded as a caveat in DST/conversion.json.
    """
    src, dst = Path(src), Path(dst)
    cast = parse_dtype(dtype)
    model = open_hf(src)
    target = family_named(to)
    held = target.express(model.spec)
    where = str(src)
    tensors = read_canonical(model.entries, model.family, model.spec, where)
    tensors, checks, caveats = adapt(tensors, model.spec, held, model.family, to, allow)
    for check in checks:
        check.run(tensors, to)
    planned = plan_target(tensors, target, held, cast)
    report = Report(model.family.model_type, to, len(planned), sum(t.nbytes for t in planned), caveats)

    extra = {k: model.config[k] for k in PASSTHROUGH if k in model.config}
    if "torch_dtype" in model.config and "dtype" not in extra:
        extra["dtype"] = model.config["torch_dtype"]
    if cast is not None:
        extra["dtype"] = str(cast).removeprefix("torch.")
    config = target.config(held, extra)
    validate_config(config, to)
    with atomic_dir(dst, force) as out:
        write_dir(planned, out, max_shard_bytes)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in side_files(src):
            shutil.copy2(path, out / path.name)
        (out / RECORD).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
