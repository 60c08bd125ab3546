"""A torch.save file written one tensor at a time, so that a Megatron-LM rank file is never held
whole in memory.

torch.save pickles the object first, then writes every storage as a record `data/<key>` of a zip
(torch's own PyTorchFileWriter: stored, 64-byte aligned, CRC-32 of each record). Here each
tensor's record is written with that same writer as soon as the tensor is cut, and the pickle
last, once every tensor is in: zip readers find records through the central directory, not by
their order, so torch.load (mmap or not), Megatron-LM and `unzip -t` read the file as they read
torch.save's. The pickle is torch.save's byte for byte (tests/megatron/test_torch_file.py): a
written tensor is pickled through a stand-in that reduces as `Tensor._reduce_ex_internal`
reduces a plain CPU tensor, with the storage reference torch.save's `persistent_id` gives.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch.serialization import _get_storage_alignment, get_crc32_options


def own_bytes(x: torch.Tensor) -> torch.Tensor:
    """`x` as a tensor whose storage is exactly its bytes, which torch.save and a record write
    whole: a contiguous view aliased, not copied (a numpy array of it starts at its first byte,
    and torch.from_numpy makes that the storage's start), anything else copied."""
    if not x.is_contiguous():
        return x.clone(memory_format=torch.contiguous_format)
    if x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.nbytes:
        return x
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype)
    flat = torch.from_numpy(x.reshape(-1).view(torch.uint8).numpy())  # keeps x's memory alive
    return flat.view(x.dtype).view(x.shape)


class _Storage:
    """A storage already written as record `data/<key>`, as torch.save's persistent_id names it."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel

    def pid(self) -> tuple[Any, ...]:
        if self.dtype in torch.storage._new_dtypes():  # uint16 and the like: an untyped storage
            return ("storage", torch.UntypedStorage, self.key, "cpu", self.numel * self.dtype.itemsize)
        kind = torch.TypedStorage(dtype=self.dtype, device="meta", _internal=True)._pickle_storage_type()
        return ("storage", getattr(torch, kind), self.key, "cpu", self.numel)


class Written:
    """A tensor whose bytes are in the file already: pickled as that tensor, without its data."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        args = (self.storage, 0, self.shape, self.stride, False, OrderedDict())
        if self.storage.dtype in torch.storage._new_dtypes():
            return (torch._utils._rebuild_tensor_v3, (*args, self.storage.dtype))
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return obj.pid()
        if isinstance(obj, torch.Tensor | torch.UntypedStorage | torch.TypedStorage):
            raise TypeError("a tensor not written through TorchFile.tensor: its bytes would be missing")
        return None


class TorchFile:
    """`path` written as torch.save(obj, path) would write it, where obj holds the stand-ins
    `tensor` returned in the order they were written (torch.save numbers storages in the order
    its pickle meets them; the same order gives the same file)."""

    def __init__(self, path: Path) -> None:
        self._stream = None
        try:
            str(path).encode("ascii")
            target: Any = str(path)
        except UnicodeEncodeError:  # torch's writer takes ASCII names only; torch.save falls back so too
            target = self._stream = open(path, "wb")  # noqa: SIM115 (closed in finish)
        self._zip = torch._C.PyTorchFileWriter(target, get_crc32_options(), _get_storage_alignment())
        self._count = 0

    def tensor(self, x: torch.Tensor) -> Written:
        """Write `x`'s bytes as the next record now; `x` may be released afterwards."""
        if x.device.type != "cpu" or x.layout != torch.strided or x.is_quantized or x.requires_grad:
            raise ValueError(f"TorchFile writes plain CPU tensors only, not {x.device} {x.layout}")
        if x.is_conj() or x.is_neg():
            x = x.resolve_conj().resolve_neg()
        x = own_bytes(x)  # the record is written from the storage's start
        storage = _Storage(str(self._count), x.dtype, x.numel())
        self._zip.write_record(f"data/{storage.key}", x.untyped_storage(), x.nbytes)
        self._count += 1
        return Written(storage, tuple(x.shape), x.stride())

    def finish(self, obj: Any) -> None:
        """Pickle `obj` and close the zip, with torch.save's other records."""
        buf = io.BytesIO()
        _Pickler(buf, protocol=torch.serialization.DEFAULT_PROTOCOL).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", len("1"))
        alignment = str(_get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        if self._stream is not None:
            self._stream.close()
