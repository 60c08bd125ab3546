"""Loading any supported directory into the unified model: an HF family's (transformers
families and the remote-code layouts), a unified one, or a Megatron checkpoint.

The converters' readers turn the directory into canonical tensors (one key map, theirs); the
model is built on the meta device and the tensors are assigned as views of the files' pages
(mmap): no random initialisation, nothing read before it is used, and each tensor keeps its
stored dtype unless one is asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reference.modeling.config import UnifiedConfig
from reference.modeling.model import UnifiedForCausalLM, UnifiedModel
from reference.modeling.rope import Rotary


def load(path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None,
         cls: type[UnifiedModel] = UnifiedForCausalLM) -> UnifiedModel:
    """The model in `path` as `cls` (a causal LM, or with a score head UnifiedForRewardModel),
    in eval mode, on the CPU."""
    from reference.converters.plan import SCORE
    from reference.converters.safetensors_io import Mapped
    from reference.converters.source import open_source
    from reference.converters.unified_dir import held
    from reference.errors import Inexpressible, InputError
    from reference.families.verdict import blocking

    source = open_source(Path(path), any_fit=True, dtype=dtype)  # the spec, not the family's name, is used
    refused = blocking(source.spec, held(source.spec))
    if refused:
        f = refused[0]
        raise Inexpressible("unified", f, f"the model has {f}={getattr(source.spec, f)!r}; "
                                          "the unified model does not compute it yet")
    if not source.tensors:
        raise InputError(f"{path}: the tensor layout of {source.family.model_type} is not mapped yet")
    config = UnifiedConfig.from_spec(source.spec, source.config, **source.extra)
    config._attn_implementation = attn_implementation or "sdpa"
    with torch.device("meta"):
        model = cls(config)
    scored, wanted = SCORE in source.tensors, hasattr(model, "score")
    if scored and not wanted:
        raise InputError(f"{path}: a sequence-classification checkpoint ('{SCORE}', no lm_head): "
                         "load it with UnifiedForRewardModel")
    if wanted and not scored:
        raise InputError(f"{path}: no '{SCORE}': UnifiedForRewardModel loads a family's"
                         " ForSequenceClassification directory (num_labels=1) or a unified one with it")
    state, files = {}, Mapped()
    for name, lazy in source.tensors.items():
        # a tensor stored as it is used is a view of its file; one that is split, merged or
        # cast is computed from it
        t = files.tensor(lazy.entry) if lazy.entry is not None else lazy.load()
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    tied = source.spec.tie_word_embeddings and hasattr(model, "lm_head")
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.embed.weight
    model.rotary = Rotary(config)  # buffers computed, not stored: rebuilt off the meta device
    if (Path(path) / "generation_config.json").is_file():  # eos ids and sampling defaults
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
