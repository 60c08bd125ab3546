"""Debug probes of the unified model, read from the most recent forward run inside
`with model.record(): model(...)`:

    show_cos_distance(layer)                  how much a layer turns the residual stream
    show_topk_token(layer, k)                 the logit lens: what a layer's output would predict
    show_attention(layer, token_a, token_b)   how much one token attends to another

Recording hangs forward hooks on the blocks (their input and output hidden states) and on each
attention's kernel (the q, k, v and mask it computes from), and removes them on leaving the
block: outside `record()` the model runs with no hook at all. Attention weights are recomputed
from the recorded q and k by the eager kernel, with the layer's own scale, softcap and mask
(window, padding, ALiBi): exact whatever backend ran the forward (sdpa returns no weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from reference.modeling import attention


@dataclass
class Recording:
    """What one forward left behind; tensors detached."""

    input_ids: torch.Tensor | None = None  # (B, T), None when run from inputs_embeds
    hidden: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (in, out)
    # layer -> (q, k, v, mask, scale, softcap), as its attention kernel got them
    kernel: dict[int, tuple[Any, ...]] = field(default_factory=dict)


@dataclass
class TopK:
    """The logit lens of one layer: the k most likely next tokens at each position."""

    ids: torch.Tensor  # (B, T, k)
    probs: torch.Tensor  # (B, T, k), fp32
    tokens: list[list[list[str]]] | None  # [B][T][k] token strings, given a tokenizer

    def at(self, position: int, row: int = 0) -> list[tuple[int, float]]:
        """[(token id, probability)] at one position, most likely first."""
        return list(zip(self.ids[row, position].tolist(), self.probs[row, position].tolist(), strict=True))


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


class Probes:
    """The probes of UnifiedForCausalLM (a mixin: it reads `layers`, `norm`, `_head`, `spec`)."""

    tokenizer: Any = None  # attach one (model.tokenizer = ...) for token strings
    _recording: Recording | None = None

    @contextmanager
    def record(self) -> Iterator[None]:
        """Record every forward run inside the block; the probes read the most recent one."""
        if getattr(self, "_sequence_parallel", None) is not None:  # each rank sees its slice only
            raise ValueError("the probes do not combine with sequence parallelism: record in one process")
        handles = []

        def start(_module: Any, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._recording = Recording(input_ids=_detach(ids))

        def block(i: int):  # noqa: ANN202
            def hook(_module: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
                x = args[0] if args else kwargs["x"]
                self._recording.hidden[i] = (x.detach(), out.detach())
            return hook

        def kernel(i: int):  # noqa: ANN202
            def hook(_module: Any, args: tuple, kwargs: dict, _out: Any) -> None:
                names = ("backend", "q", "k", "v", "mask", "scale", "softcap")
                given = dict(zip(names, args, strict=False)) | kwargs
                self._recording.kernel[i] = tuple(_detach(given[n]) for n in names[1:])
            return hook

        try:
            handles.append(self.register_forward_pre_hook(start, with_kwargs=True))
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_hook(block(i), with_kwargs=True))
                handles.append(layer.attn.kernel.register_forward_hook(kernel(i), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _recorded(self) -> Recording:
        if self._recording is None or not self._recording.hidden:
            raise RuntimeError("no recorded forward: run the model inside "
                               "`with model.record(): model(...)` first")
        return self._recording

    def _layer(self, layer: int) -> int:
        n = len(self.layers)
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} out of range: this model has {n} layers (0..{n - 1})")
        return layer % n

    def _tokens(self, tokenizer: Any, row: int) -> list[str] | None:
        """The recorded input of `row` as token strings, given a tokenizer."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        ids = self._recorded().input_ids
        if tokenizer is None or ids is None:
            return None
        return [tokenizer.decode([i]) for i in ids[row].tolist()]

    def show_cos_distance(self, layer: int, *, show: bool = False, tokenizer: Any = None) -> torch.Tensor:
        """(B, T) fp32: 1 - cosine similarity of the layer's input and output hidden states."""
        i = self._layer(layer)
        x, y = self._recorded().hidden[i]
        distance = 1 - F.cosine_similarity(x.float(), y.float(), dim=-1)
        if show:
            print(f"layer {i}: cosine distance between its input and output")
            for b in range(distance.shape[0]):
                rows = [[str(t), *self._label(tokenizer, b, t), f"{d:.4f}"]
                        for t, d in enumerate(distance[b].tolist())]
                self._table(tokenizer, ["pos", "1 - cos"], rows, b, distance.shape[0])
        return distance

    def show_topk_token(self, layer: int, k: int = 10, *, show: bool = False, tokenizer: Any = None) -> TopK:
        """The logit lens: the layer's output through the final norm (once) and the head (its
        multipliers and softcap as in the forward), softmax in fp32, the k most likely tokens."""
        i = self._layer(layer)
        _, y = self._recorded().hidden[i]
        with torch.no_grad():
            probs = self._head(self.norm(y)).float().softmax(-1)  # (B, T, V)
        top = probs.topk(k, dim=-1)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        strings = None
        if tokenizer is not None:
            strings = [[[tokenizer.decode([t]) for t in pos] for pos in row] for row in top.indices.tolist()]
        result = TopK(top.indices, top.values, strings)
        if show:
            print(f"layer {i}: logit lens, the {k} most likely next tokens")
            for b in range(top.indices.shape[0]):
                rows = []
                for t in range(top.indices.shape[1]):
                    guesses = [f"{_show(strings[b][t][j]) if strings else tid} {p:.3f}"
                               for j, (tid, p) in enumerate(result.at(t, b))]
                    rows.append([str(t), *self._label(tokenizer, b, t), "  ".join(guesses)])
                self._table(tokenizer, ["pos", "next (probability)"], rows, b, top.indices.shape[0])
        return result

    def attention_weights(self, layer: int) -> torch.Tensor:
        """(B, H, T, S): the layer's attention weights, recomputed by the eager kernel from the
        recorded q, k, v and mask with the layer's scale and softcap."""
        q, k, v, mask, scale, softcap = self._recorded().kernel[self._layer(layer)]
        with torch.no_grad():
            return attention.eager(q, k, v, mask, scale, softcap)[1]

    def show_attention(self, layer: int, token_a: int | str, token_b: int | str | None,
                       head: int | None = None, *, row: int = 0, show: bool = False,
                       tokenizer: Any = None) -> torch.Tensor:
        """The attention weight of query position token_a on key position token_b of `row`: over
        heads (H,) when head is None. Positions may be negative, or token strings found in the
        recorded text (needs a tokenizer). token_b None: every key, (H, S) or (S,)."""
        i = self._layer(layer)
        weights = self.attention_weights(i)[row]  # (H, T, S)
        tokens = self._tokens(tokenizer, row)
        t, s = weights.shape[1], weights.shape[2]
        a = self._position(token_a, t, tokens, "token_a")
        b = None if token_b is None else self._position(token_b, s, tokens, "token_b", offset=s - t)
        picked = weights[:, a] if b is None else weights[:, a, b]  # (H, S) or (H,)
        picked = picked if head is None else picked[head]
        if show:
            name = f" ({_show(tokens[a])})" if tokens else ""
            heads = range(weights.shape[0]) if head is None else [head]
            keys = range(a + s - t + 1) if b is None else [b]  # the keys a causal query sees
            print(f"layer {i}: attention of query {a}{name} per head")
            rows = []
            for key in keys:
                label = ([_show(tokens[key - (s - t)]) if key >= s - t else ""] if tokens else [])
                rows.append([str(key), *label, *(f"{weights[h, a, key]:.4f}" for h in heads)])
            _table(["key", *(["token"] if tokens else []), *(f"head {h}" for h in heads)], rows, None)
        return picked

    @staticmethod
    def _position(token: int | str, n: int, tokens: list[str] | None, name: str, offset: int = 0) -> int:
        """A position in 0..n-1 from an index (negative counts from the end) or a token string
        found once in the recorded text (its first occurrence when repeated)."""
        if isinstance(token, int):
            if not -n <= token < n:
                raise IndexError(f"{name}={token} out of range: {n} positions")
            return token % n
        if tokens is None:
            raise ValueError(f"{name}={token!r}: a token string needs a tokenizer (model.tokenizer = ...) "
                             "and a forward recorded from input_ids")
        found = [j for j, s in enumerate(tokens) if s == token] or [j for j, s in enumerate(tokens)
                                                                     if s.strip() == token.strip()]
        if not found:
            raise ValueError(f"{name}={token!r} is no token of the recorded text: {tokens}")
        return found[0] + offset

    def _label(self, tokenizer: Any, row: int, position: int) -> list[str]:
        """[the token string at a position], or [] without a tokenizer."""
        tokens = self._tokens(tokenizer, row)
        return [_show(tokens[position])] if tokens else []

    def _table(self, tokenizer: Any, header: list[str], rows: list[list[str]], row: int,
               rows_in_batch: int) -> None:
        """A per-position table of one batch row; a token column after the first given a tokenizer."""
        if self._tokens(tokenizer, row) is not None:
            header = [header[0], "token", *header[1:]]
        _table(header, rows, f"row {row}" if rows_in_batch > 1 else None)


def _show(token: str) -> str:
    """A token string printable in one cell: line breaks escaped, edge spaces made visible."""
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    core = token.strip(" ")
    lead, trail = len(token) - len(token.lstrip(" ")), len(token) - len(token.rstrip(" "))
    return "␣" * lead + core + "␣" * trail if core else "␣" * len(token)


def _table(header: list[str], rows: list[list[str]], title: str | None) -> None:
    if title:
        print(title)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
