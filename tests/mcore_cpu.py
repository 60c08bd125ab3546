"""Real megatron-core on the CPU, in test processes only (shared/notes/megatron-core-on-cpu.md).

The notes' three side-steps, plus one more: a tied embedding with PP > 1 is synchronised at
construction by `weight.data.cuda()` and an all-reduce, so `Tensor.cuda` is the identity here.
"""

from __future__ import annotations

import contextlib

from reference.verify.cpu import CPU_CONFIG  # noqa: F401  (tests build their own configs with it)


def side_steps() -> None:
    """Patch, in this process, what megatron-core assumes of CUDA."""
    import torch
    from megatron.core import tensor_parallel

    class NoRngTracker:
        def fork(self, *args: object, **kwargs: object) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()  # dropout is 0: no random numbers are drawn

    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: NoRngTracker()
    moe_side_steps()
    mla_side_steps()


def mla_side_steps() -> None:
    """Without TransformerEngine, megatron.core.extensions.transformer_engine still imports (its
    TE classes are mocks), so multi_latent_attention sets HAVE_TE and then asks
    isinstance(linear_proj, TELinear) of a mock, a TypeError: say there is no TE, as is true here."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def moe_side_steps() -> None:
    """The notes' two MoE side-steps: the router's gating linear reads `te_general_gemm`, never
    defined without TransformerEngine; the MoE layer makes a CUDA side stream for shared experts."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    class NoStream:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def wait_stream(self, *args: object) -> None:
            pass

    moe_utils.te_general_gemm = None
    torch.cuda.Stream = NoStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: NoStream()

