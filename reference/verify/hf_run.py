"""An HF directory run by its family's transformers class; a unified one by the unified model.

Both run the token ids in fp32 and again in fp64 (the noise floor, see `compare.py`). With
`layers`, the answer is the residual stream after that many decoder layers, captured by a hook
on the layer itself (HF's last `hidden_states` entry is already normalised, so it would not
compare with megatron-core's); a transformers model is then built with those layers only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reference.errors import InputError

DTYPES = ("float32", "float64")


def _keep(seen: list[torch.Tensor]) -> Callable[..., None]:
    """A forward hook that keeps a decoder layer's output hidden states (a layer returns them
    alone, or first in a tuple)."""
    return lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out)


def run_twice(model: Any, blocks: Callable[[Any], Any], ids: torch.Tensor,
              layers: int | None) -> dict[str, torch.Tensor]:
    """{"float32": out, "float64": out}: logits, or the output of block `layers` (1-based)."""
    out: dict[str, torch.Tensor] = {}
    for name in DTYPES:
        model.to(getattr(torch, name))
        seen: list[torch.Tensor] = []
        handle = None
        if layers is not None:
            handle = blocks(model)[layers - 1].register_forward_hook(_keep(seen))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if handle is not None:
            handle.remove()
        out[name] = seen[0] if layers is not None else logits
    return out


def run_hf(path: Path, ids: torch.Tensor, layers: int | None) -> dict[str, torch.Tensor]:
    """The family's transformers class, with the first `layers` layers only when given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if layers is not None:
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    from transformers.utils import logging

    bar, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    # verify prints its verdict only; the layers left out with --layers are checked below
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        # eager attention, and for a mixture transformers' eager experts loop (its default is
        # grouped_mm): the reference paths every backend is tested against
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                           attn_implementation="eager",
                                                           experts_implementation="eager",
                                                           output_loading_info=True)
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])[0]
        raise InputError(f"{path}: '{missing}' is missing (transformers would initialise it at random)")
    if layers is None and info["unexpected_keys"]:
        raise InputError(f"{path}: '{sorted(info['unexpected_keys'])[0]}' is not used by "
                         f"{type(model).__name__}")
    return run_twice(model.eval(), lambda m: m.get_decoder().layers, ids, layers)


def run_unified(path: Path, ids: torch.Tensor, layers: int | None) -> dict[str, torch.Tensor]:
    """A unified directory in the unified model (reference.modeling), every layer loaded."""
    from reference.modeling.load import load

    return run_twice(load(path, dtype=torch.float32, attn_implementation="eager"),
                     lambda m: m.layers, ids, layers)
