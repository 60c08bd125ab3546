"""The first K decoder layers of a legacy Megatron `torch` checkpoint, as one pipeline stage.

For `verify --layers K`: each TP (x EP) rank reads only the rank files whose stages hold one of
those layers (an expert-parallel rank its own files, `_EEE`: experts are numbered locally, alike
on every stage), renumbers their layers globally (a rank file numbers them from 0 on every
stage) and keeps the embedding; megatron-core then builds a model of K layers, TP and EP as
saved, PP 1, with no final norm or output layer, and loads that strictly. So the first layers
of a large checkpoint run in TP x EP processes, whatever its PP.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from typing import Any

from reference.converters.megatron import stage as S
from reference.converters.megatron.args import layout_from_args

LAYERS = "decoder.layers."


def first_layers_args(args: Namespace, k: int) -> Namespace:
    """The checkpoint's args for a model of its first `k` layers on one pipeline stage (a
    mixture's per-layer pattern of MoE and dense layers cut to those layers; EP as saved)."""
    freq = getattr(args, "moe_layer_freq", 1)
    return Namespace(**{**vars(args), "num_layers": k, "pipeline_model_parallel_size": 1,
                        "virtual_pipeline_model_parallel_size": None,
                        "pipeline_model_parallel_layout": None,
                        "decoder_first_pipeline_num_layers": None,
                        "decoder_last_pipeline_num_layers": None,
                        "moe_layer_freq": freq[:k] if isinstance(freq, list) else freq})


def first_layers_state(args: Namespace, k: int,
                       rank_state: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Embedding and layers 0..k-1 of one TP (x EP) rank, keyed as a PP 1 model names them;
    `rank_state(pp_rank)` loads that pipeline rank's file of this rank (only those needed are loaded)."""
    layout, counts = layout_from_args(args, "args")
    out: dict[str, Any] = {}
    for pp_rank in range(layout.pp):
        wanted = [(chunk, st) for chunk, st in enumerate(S.stages(counts)[pp_rank::layout.pp])
                  if st.first or st.start < k]
        if not wanted:
            continue
        state = rank_state(pp_rank)
        for chunk, st in wanted:
            for key, value in state[S.model_key(chunk, layout.vpp)].items():
                if key.startswith(LAYERS):
                    local, rest = key[len(LAYERS):].split(".", 1)
                    if st.start + int(local) < k:
                        out[f"{LAYERS}{st.start + int(local)}.{rest}"] = value
                elif key.startswith("embedding.") and st.first:
                    out[key] = value
    return out
