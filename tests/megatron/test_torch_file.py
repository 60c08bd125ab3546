"""TorchFile (a torch.save file written tensor by tensor) against torch.save of the same object:
the same pickle byte for byte, the same records, a valid zip, and the same object loaded back."""

from __future__ import annotations

import zipfile
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import torch

from reference.converters.megatron.read import load_rank_file
from reference.converters.megatron.torch_file import TorchFile, own_bytes


def _state() -> dict[str, Any]:
    """A rank file's shape of object: args, plain values, models of tensors in several dtypes,
    an empty `_extra_state` tensor and None values."""
    gen = torch.Generator().manual_seed(0)
    model = {"embedding.word_embeddings.weight": torch.randn(10, 6, generator=gen).to(torch.bfloat16),
             "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(12, 6, generator=gen),
             "decoder.layers.0.self_attention.linear_qkv._extra_state": torch.empty(0, dtype=torch.uint8),
             "decoder.layers.0.mlp.linear_fc1._extra_state": None,
             "decoder.layers.0.mlp.router.expert_bias": torch.arange(4, dtype=torch.float16),
             "decoder.layers.0.mlp.counts": torch.arange(5, dtype=torch.int32).to(torch.uint16),
             "decoder.final_layernorm.weight": torch.randn(6, generator=gen).to(torch.bfloat16)}
    return {"args": Namespace(hidden_size=6, params_dtype=torch.bfloat16, rotary_base=10000.0),
            "checkpoint_version": 3.0, "iteration": 1,
            "model0": model, "model1": {"decoder.layers.0.x": torch.ones(2, 3, dtype=torch.int64)}}


def _incremental(state: dict[str, Any], path: Path) -> None:
    f = TorchFile(path)
    out: dict[str, Any] = {}
    for name, value in state.items():  # tensors written in the order the pickle meets them
        out[name] = ({k: f.tensor(t) if isinstance(t, torch.Tensor) else t for k, t in value.items()}
                     if isinstance(value, dict) else value)
    f.finish(out)


def _records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC-32 is right
        return {i.filename: z.read(i) for i in z.infolist()}


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bitwise
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, Namespace):
        assert vars(a) == vars(b)
    else:
        assert a == b


def test_file_is_torch_saves(tmp_path) -> None:
    (tmp_path / "ours").mkdir()
    (tmp_path / "torch").mkdir()
    ours, theirs = tmp_path / "ours" / "model_optim_rng.pt", tmp_path / "torch" / "model_optim_rng.pt"
    state = _state()
    _incremental(state, ours)
    torch.save(state, theirs)
    a, b = _records(ours), _records(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        if not name.endswith("serialization_id"):  # fresh in every file torch writes
            assert a[name] == b[name], name  # the pickle (data.pkl) too, byte for byte
    _assert_same(load_rank_file(ours), load_rank_file(theirs))  # as the reader loads: mmap, weights only
    # safe_globals() drops on exit what it is given, even if registered before (megatron-core
    # registers Namespace at import, and later tests in this process fork ranks that need it)
    missing = [g for g in [Namespace] if g not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(missing):
        for mmap in (True, False):
            _assert_same(torch.load(ours, weights_only=True, mmap=mmap),
                         torch.load(theirs, weights_only=True, mmap=mmap))
    _assert_same(torch.load(ours, weights_only=False), state)


def test_views_are_written_as_their_bytes(tmp_path) -> None:
    """A view (strided, or at an offset in its storage) is written as its own bytes, not its
    storage's, and loads equal."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    views = {"cols": base[:, 4:], "rows": base[3:], "t": base.t()}
    f = TorchFile(tmp_path / "v.pt")
    f.finish({k: f.tensor(v) for k, v in views.items()})
    loaded = torch.load(tmp_path / "v.pt", weights_only=True, mmap=True)
    for k, v in views.items():
        assert torch.equal(loaded[k], v) and loaded[k].untyped_storage().nbytes() == v.nbytes, k


def test_a_tensor_not_written_first_is_refused(tmp_path) -> None:
    f = TorchFile(tmp_path / "x.pt")
    with pytest.raises(TypeError, match="not written through TorchFile.tensor"):
        f.finish({"a": torch.ones(2)})


def test_own_bytes_aliases_a_run_of_rows_and_copies_only_strided_views() -> None:
    base = torch.arange(48, dtype=torch.float32).to(torch.bfloat16).reshape(6, 8)
    rows = own_bytes(base[2:5])  # the bytes the writers would otherwise copy: a source's row run
    assert rows.data_ptr() == base[2:5].data_ptr() and rows.untyped_storage().nbytes() == rows.nbytes
    assert torch.equal(rows, base[2:5]) and own_bytes(base) is base
    cols = own_bytes(base[:, 4:])
    assert cols.data_ptr() != base.data_ptr() and torch.equal(cols, base[:, 4:]) and cols.is_contiguous()
