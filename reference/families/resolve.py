"""A config.json as the model that loads it will read it.

A config.json need not spell out every field: transformers fills what is absent from the
family's config class, and that class may rewrite a legacy value (Gemma's config class turns
`hidden_act: "gelu"`, which its releases carry, into the tanh approximation they were trained
with). Reading the raw dict with Llama's defaults would then describe another model: a Gemma
config without `hidden_act` is not a SiLU model, a Mistral config without `sliding_window` has
a window of 4096. So the spec is read from what the class makes of the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reference.errors import InputError


def as_loaded(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`cfg` with the defaults and rewrites of its transformers config class applied; as written
    for a layout with no class in transformers (remote code: its fields are read as they are).
    Raises, naming `where`, if the class rejects it: a reader's check of a config.json and a
    writer's of the one it is about to write."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return dict(cfg)
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        loaded = AutoConfig.for_model(model_type, **fields).to_dict()
    except Exception as e:  # transformers raises several types; its message names the field
        reason = str(e).strip().splitlines()[-1].strip()
        rejects = f"transformers' {model_type} config class rejects it"
        raise InputError(f"{where}: {rejects}: {reason}") from None
    return {**loaded, "model_type": model_type}
