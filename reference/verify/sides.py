"""One side of a verification: what the directory is and which implementation runs it.

HF directory: its family's transformers class (a family with no class in transformers, a
remote-code layout, is refused by name). Unified directory: the unified model. Megatron-LM
`torch` or `torch_dist` checkpoint: megatron-core's GPTModel at the saved layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reference.errors import InputError
from reference.families.spec import ModelSpec


@dataclass(frozen=True)
class Side:
    path: Path
    kind: str  # "hf", "unified", "torch" or "torch_dist"
    label: str  # what runs it, for the report
    spec: ModelSpec
    job: object | None = None  # a MegatronJob template for the Megatron kinds (ids filled in later)

    def run(self, ids: torch.Tensor, layers: int | None,
            start_method: str = "spawn") -> dict[str, torch.Tensor]:
        """{"float32": out, "float64": out} of this side's own implementation (`start_method`:
        of the Megatron ranks, see `run_megatron`)."""
        from dataclasses import replace

        if self.kind == "hf":
            from reference.verify.hf_run import run_hf

            return run_hf(self.path, ids, layers)
        if self.kind == "unified":
            from reference.verify.hf_run import run_unified

            return run_unified(self.path, ids, layers)
        from reference.verify.mcore_ranks import run_megatron

        job = replace(self.job, ids=ids.tolist(), layers=layers)
        if layers is not None and self.kind == "torch":
            job = replace(job, world=job.stage)  # the first layers run at PP 1 (first_layers.py)
        return run_megatron(job, start_method)


def _megatron(path: Path, spec: ModelSpec) -> Side:
    from reference.converters.megatron.args import layout_from_args
    from reference.converters.megatron.dist import COMMON, _iteration_dir, is_dist_checkpoint, load_common
    from reference.converters.megatron.read import _open
    from reference.verify.mcore_ranks import MegatronJob

    if is_dist_checkpoint(path):
        _, where = _iteration_dir(path)
        layout, _ = layout_from_args(load_common(where / COMMON)["args"], str(where / COMMON))
        kind, files = "torch_dist", {"dir": str(where)}
    else:
        ck = _open(path)
        layout = ck.layout
        kind = "torch"
        files = {f"{t},{p},{e}": str(ck.file(t, p, e)) for t, p, e in ck.ranks()}
    # expert parallelism is data parallelism outside the experts: every EP rank runs the model
    world = layout.stage_ranks * layout.pp
    vpp = f" vpp {layout.vpp}" if layout.vpp else ""
    ep = f" ep {layout.ep}" if layout.ep > 1 else ""
    etp = f" etp {layout.expert_tp}" if layout.expert_tp != layout.tp else ""
    label = f"megatron-core GPTModel, {kind} tp {layout.tp} pp {layout.pp}{vpp}{ep}{etp}"
    job = MegatronJob(kind=kind, files=files, world=world, stage=layout.stage_ranks,
                      layer_spec=layout.layer_spec, vocab_size=spec.vocab_size, ids=[], layers=None)
    return Side(path, kind, label, spec, job)


def open_side(path: Path) -> Side:
    """What `path` holds and what will run it; bad input raises InputError (one line)."""
    from reference.converters import megatron
    from reference.converters.source import open_source
    from reference.converters.unified_dir import is_unified_dir

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such checkpoint directory")
    source = open_source(path, any_fit=True)  # validates it; the spec, not the family's name, is used
    if megatron.is_megatron_dir(path):
        return _megatron(path, source.spec)
    if is_unified_dir(path):
        return Side(path, "unified", "reference unified model", source.spec)
    import transformers

    family = source.family
    if getattr(transformers, family.architecture, None) is None:
        raise InputError(f"{path}: family {family.model_type} has no class in transformers "
                         f"({family.architecture} is remote code): verify runs each side with its "
                         "own implementation and has none for it")
    return Side(path, "hf", f"transformers {family.architecture}", source.spec)
