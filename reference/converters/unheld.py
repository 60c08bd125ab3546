"""Parts of a published checkpoint that neither transformers' class of its family nor the unified
model computes with: kept apart by the reader, refused by a conversion by name, dropped (and
recorded) only when the user says so with `--allow-drop FEATURE`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from reference.errors import InputError


@dataclass(frozen=True)
class Unheld:
    """Extra decoder layers after the model's own, counted by a config field."""

    feature: str  # the name --allow-drop takes
    what: str
    count: str  # the config field that counts the extra layers
    prefix: str  # the keys of extra layer n start with prefix.format(n)
    # The config's field once the layers are dropped. DeepSeek-V3's multi-token-prediction
    # layer: transformers reads `num_nextn_predict_layers` as `num_mtp_layers`, defaulting to 1
    # when absent, and `generate(use_mtp=True)` builds that many MTP layers and loads them from
    # the files; 0 says what the written directory holds (a plain decoder) and is what its
    # config documents for one.
    dropped: int = 0


UNHELD = (Unheld("mtp", "multi-token-prediction layer", "num_nextn_predict_layers", "model.layers.{}."),)


def split_unheld(keys: Collection[str], config: Mapping[str, Any],
                 num_layers: int) -> dict[str, list[str]]:
    """Feature -> the keys of it the checkpoint holds (only features with some)."""
    out: dict[str, list[str]] = {}
    for u in UNHELD:
        count = config.get(u.count) or 0
        prefixes = tuple(u.prefix.format(n) for n in range(num_layers, num_layers + count))
        held = sorted(k for k in keys if prefixes and k.startswith(prefixes))
        if held:
            out[u.feature] = held
    return out


def drop_unheld(unheld: Mapping[str, list[str]], config: dict[str, Any] | None, allow: Collection[str],
                where: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The config with the dropped parts' fields set as `Unheld.dropped` says, and one caveat per
    part dropped; a part the user did not allow raises, naming it."""
    caveats: list[str] = []
    for u in UNHELD:
        keys = unheld.get(u.feature)
        if not keys:
            continue
        first = u.prefix.format(_layer(keys[0], u))
        if u.feature not in allow:
            raise InputError(f"{where}: holds a {u.what} ('{first}*', {len(keys)} tensors) that neither "
                             f"transformers' class nor the unified model computes with; --allow-drop "
                             f"{u.feature} drops it (recorded in conversion.json)")
        if config is not None:
            config = {**config, u.count: u.dropped}
        caveats.append(f"dropped {u.feature}: the {u.what} ('{first}*', {len(keys)} tensors); "
                       f"{u.count} written as {u.dropped}")
    return config, caveats


def _layer(key: str, u: Unheld) -> int:
    head, _, _ = u.prefix.partition("{}")
    return int(key.removeprefix(head).split(".", 1)[0])
