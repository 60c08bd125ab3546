"""PNG heat maps of a recorded forward (`reference inspect --plot`): a layer's attention per
head, the cosine distance of every layer at every position, and the logit lens as a grid of
layers x positions with the top next token written in each cell. matplotlib's Figure is used
directly (no pyplot, no global backend state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _token_axis(ax: Any, axis: str, tokens: list[str]) -> None:
    ticks = range(len(tokens))
    if axis == "x":
        ax.set_xticks(ticks, tokens, rotation=90, fontsize=8)
    else:
        ax.set_yticks(ticks, tokens, fontsize=8)


def attention(weights: torch.Tensor, tokens: list[str], layer: int, path: Path) -> Path:
    """One heat map per head of (T, T) weights: rows the query token, columns the key token."""
    heads = weights.shape[0]
    cols = min(heads, 3)
    rows = math.ceil(heads / cols)
    side = 1.2 + 0.32 * len(tokens)
    fig = _figure(cols * side + 1, rows * side + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(weights[h].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}")
        _token_axis(ax, "x", tokens)
        _token_axis(ax, "y", tokens)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
    fig.colorbar(image, ax=axes, label="attention weight", shrink=0.8)
    fig.suptitle(f"Layer {layer} attention weights per head (row: query attends to column: key)")
    fig.savefig(path, dpi=110)
    return path


def _layer_grid(values: torch.Tensor, labels: list[list[str]], tokens: list[str], path: Path, *,
                width: float, cmap: str, vmax: float | None, dark_above: float, dark_text: str,
                light_text: str, colorbar: str, title: str) -> Path:
    """A (layers, T) heat map with a label written in each cell: layers down, input tokens
    across. A cell whose value passes `dark_above` gets `dark_text`, the others `light_text`."""
    layers = values.shape[0]
    fig = _figure(2.5 + width * len(tokens), 1.8 + 0.45 * layers)
    ax = fig.subplots()
    image = ax.imshow(values.float().numpy(), cmap=cmap, vmin=0.0 if vmax else None, vmax=vmax,
                      aspect="auto")
    _token_axis(ax, "x", tokens)
    ax.set_yticks(range(layers), [str(i) for i in range(layers)])
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer")
    for i in range(layers):
        for t in range(len(tokens)):
            dark = float(values[i, t]) > dark_above
            ax.text(t, i, labels[i][t], ha="center", va="center", fontsize=7,
                    color=dark_text if dark else light_text)
    fig.colorbar(image, ax=ax, label=colorbar)
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    return path


def cos_distance(distance: torch.Tensor, tokens: list[str], path: Path) -> Path:
    """(layers, T): 1 - cos(layer input, layer output) at each position."""
    labels = [[f"{float(v):.2f}" for v in row] for row in distance]
    return _layer_grid(distance, labels, tokens, path, width=0.45, cmap="magma", vmax=None,
                       dark_above=0.6 * float(distance.max()), dark_text="black", light_text="white",
                       colorbar="1 - cos(input, output)",
                       title="Cosine distance between each layer's input and output hidden states")


def logit_lens(top_tokens: list[list[str]], top_probs: torch.Tensor, tokens: list[str], path: Path) -> Path:
    """(layers, T): each layer's most likely next token through the final norm and the head,
    coloured by its probability."""
    return _layer_grid(top_probs, top_tokens, tokens, path, width=0.75, cmap="Blues", vmax=1.0,
                       dark_above=0.5, dark_text="white", light_text="black",
                       colorbar="probability of the top token",
                       title="Logit lens: each layer's most likely next token "
                             "(its output through the final norm and head)")


def write(model: Any, directory: Path, layer: int, tokenizer: Any, row: int = 0) -> list[Path]:
    """The three PNGs of the model's most recent recorded forward, in `directory`."""
    from reference.modeling.probes import _show

    directory.mkdir(parents=True, exist_ok=True)
    layer = model._layer(layer)
    tokens = [_show(t) for t in model._tokens(tokenizer, row)]
    n = len(model.layers)
    distance = torch.stack([model.show_cos_distance(i)[row] for i in range(n)])  # (layers, T)
    lenses = [model.show_topk_token(i, k=1, tokenizer=tokenizer) for i in range(n)]
    top_tokens = [[_show(lens.tokens[row][t][0]) for t in range(len(tokens))] for lens in lenses]
    top_probs = torch.stack([lens.probs[row, :, 0] for lens in lenses])  # (layers, T)
    return [
        attention(model.attention_weights(layer)[row], tokens, layer,
                  directory / f"attention_layer{layer}.png"),
        cos_distance(distance, tokens, directory / "cos_distance.png"),
        logit_lens(top_tokens, top_probs, tokens, directory / "logit_lens.png"),
    ]
