"""megatron-core's CUDA assumptions side-stepped on the CPU, and its TransformerEngine ones where
TE is not installed, for the duration of a `with` block.

The one place in the library where these patches are allowed (shared/notes/megatron-core-on-cpu.md
explains each): `reference verify` runs megatron-core's own GPTModel on a machine without a GPU.
Everything patched is put back on exit, so nothing leaks into the caller's process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# TransformerConfig fields that keep megatron-core off fused CUDA kernels and CUDA memory.
CPU_CONFIG = dict(
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    use_cpu_initialization=True,
)


class _NoRngTracker:
    """Dropout is 0 in inference: the CUDA RNG tracker's fork draws no random numbers."""

    def fork(self, *args: object, **kwargs: object) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


_ABSENT = object()  # an attribute the module does not define: deleted again on exit


@contextlib.contextmanager
def _patched(patches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set each (owner, name, value); put every one back on exit, even when the block raises."""
    saved = [(owner, name, getattr(owner, name, _ABSENT)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


@contextlib.contextmanager
def cpu_side_steps() -> Iterator[None]:
    """Patch, in this process, what megatron-core assumes of CUDA; restore it all on exit.

    - the rotary embedding asks `torch.cuda.current_device()`: "cpu";
    - a tied embedding with PP > 1 is synchronised by `weight.data.cuda()`: the identity;
    - dot-product attention forks the CUDA RNG tracker: a no-op fork;
    - the distributed-checkpoint path calls `torch.cuda.synchronize()`: a no-op.
    (The fourth, the causal mask built on CUDA, is avoided by always passing a mask.)
    """
    import torch
    from megatron.core import tensor_parallel

    with _patched([
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.Tensor, "cuda", lambda self, *args, **kwargs: self),
        (tensor_parallel, "get_cuda_rng_tracker", lambda *a, **k: _NoRngTracker()),
        (torch.cuda, "synchronize", lambda *a, **k: None),
    ]):
        yield


@contextlib.contextmanager
def te_side_steps() -> Iterator[None]:
    """Without TransformerEngine (on a GPU too), patch what megatron-core 0.16.1 assumes of it;
    restore it on exit. With TransformerEngine installed, nothing is patched.

    - the MoE router's gating linear reads `moe_utils.te_general_gemm`, a name never defined when
      TE's import fails: None, its own "no TE" value;
    - `megatron.core.extensions.transformer_engine` imports without TE (its classes are
      stand-ins), so multi_latent_attention sets HAVE_TE and then asks isinstance() of a stand-in,
      a TypeError: HAVE_TE False, as is true.
    """
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        yield
        return
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    with _patched([(moe_utils, "te_general_gemm", getattr(moe_utils, "te_general_gemm", None)),
                   (multi_latent_attention, "HAVE_TE", False)]):
        yield
