"""HF -> Megatron-LM `torch_dist` (our writer, one process, no megatron-core) -> megatron-core 0.16.1.

Every case converts a tiny HF model with `--ckpt-format torch_dist` at one layout, and the real
GPTModel, built at a layout of its own (TP x PP ranks under gloo on the CPU), loads it with
`dist_checkpointing.load(..., strict=RETURN_ALL)` (nothing unexpected, nothing left over but
the final norm's TE object) and the checkpoint's content_metadata, as Megatron-LM does: its fp32
logits must equal the HF model's at assert_close's default tolerance, and its padded vocabulary
rows must be zeros. Our `.metadata` must record exactly the keys,
global shapes and boxes of megatron-core's own `dist_checkpointing.save` at the same layout, plus
the final norm's extra state (test_megatron_te_final_norm.py says why).
The default run holds a handful of cases; `nox -s equivalence` (REFERENCE_EQUIVALENCE=1) runs
every family x tie x load layout.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import assert_bitwise, read_tensors
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared
from procs import spawn
from test_megatron_equivalence import SHAPES
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from reference.cli import main
from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.converters.megatron import dist_write as W
from reference.converters.megatron.read import load_rank_file
from reference.tiny import SHAPE, logits, tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

GATE = os.environ.get("REFERENCE_EQUIVALENCE") == "1"


@dataclass(frozen=True)
class Case:
    family: str
    tie: bool
    shape: str
    write: tuple[int, int]  # (tp, pp) the conversion is asked for
    tp: int  # the layout megatron-core loads it at
    pp: int

    @property
    def id(self) -> str:
        return (f"{self.family}-{'tied' if self.tie else 'untied'}-{self.shape}-"
                f"written-tp{self.write[0]}pp{self.write[1]}-loaded-tp{self.tp}pp{self.pp}")


DEFAULT = [
    Case("qwen2", True, "g2x8", (1, 1), 2, 2),  # bias; resharded to TP 2 x PP 2
    Case("qwen3", False, "g4x2", (2, 2), 2, 2),  # qk norm; the layout it was written for
    Case("llama", False, "g4x2", (2, 2), 1, 2),  # resharded to PP 2
    Case("llama", True, "g2x8", (1, 2), 2, 1),  # resharded to TP 2
    Case("mistral", True, "g4x2", (2, 1), 1, 1),  # merged to TP 1
]
WRITES = [(1, 1), (2, 2), (2, 1), (1, 2)]
LOADS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _matrix() -> list[Case]:
    out = []
    for i, family in enumerate(["llama", "qwen2", "qwen3", "mistral"]):
        for tie in (False, True):
            for j, (tp, pp) in enumerate(LOADS):
                shape = ("g4x2", "g2x8")[(i + j + tie) % 2]
                out.append(Case(family, tie, shape, WRITES[(i + j + 2 * tie) % 4], tp, pp))
    return out


CASES = _matrix() if GATE else DEFAULT


def cli(*args: object) -> int:
    return main(["convert", *map(str, args)])


def tied_scaled(family: str, tie: bool, **overrides: Any) -> torch.nn.Module:
    """The tiny model; a tied head at an untied head's scale (as in test_megatron_equivalence)."""
    model = tiny_model(family, tie=tie, **overrides)
    if tie:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(2 * model.config.hidden_size ** -0.5)
    return model


def write_cases(root: Path, cases: list[Any], model_of: Callable[[Any], torch.nn.Module],
                *options: str) -> Path:
    """root/hf-ID (the HF model), root/ID (our torch_dist at the case's `write` (tp, pp[, ep]),
    with `options`) and root/ID.ref.pt (HF logits) for every case."""
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(7))
    for case in cases:
        model = model_of(case)
        model.save_pretrained(root / f"hf-{case.id}")
        tp, pp, *ep = case.write
        assert cli(root / f"hf-{case.id}", root / case.id, "--to", "megatron", "--tp", tp, "--pp", pp,
                   *(("--ep", ep[0]) if ep else ()), "--ckpt-format", "torch_dist", *options) == 0
        torch.save({"input_ids": ids, "logits": logits(model, ids)}, root / f"{case.id}.ref.pt")
    return root


def assert_refused(hf: Path, capsys: Any, flags: list[str], needles: list[str]) -> None:
    """HF -> torch_dist with `flags` exits 2 with one line holding every needle, writing nothing."""
    capsys.readouterr()
    assert cli(hf, hf.parent / "out", "--to", "megatron", "--ckpt-format", "torch_dist", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert sorted(p.name for p in hf.parent.iterdir()) == [hf.name]


def assert_via_torch_writes_the_same_bytes(hf: Path, work: Path) -> None:
    """Megatron `torch` (TP 2 x EP 2) -> `torch_dist` writes the very .distcp file HF -> `torch_dist` does."""
    assert cli(hf, work / "legacy", "--to", "megatron", "--tp", 2, "--ep", 2) == 0
    for src, dst in ((hf, "direct"), (work / "legacy", "via-torch")):
        assert cli(src, work / dst, "--to", "megatron", "--tp", 2, "--ep", 2,
                   "--ckpt-format", "torch_dist") == 0
    direct, via = (work / d / "iter_0000001" for d in ("direct", "via-torch"))
    assert (direct / "__0_0.distcp").read_bytes() == (via / "__0_0.distcp").read_bytes()
    assert _boxes(direct) == _boxes(via)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("distw"), CASES,
                       lambda c: tied_scaled(c.family, c.tie, **SHAPES[c.shape]))


@pytest.fixture(scope="module")
def loaded(written, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per case: errors from any rank, whether a last stage compared the logits."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_dist_ranks import load_case
    from mcore_ranks import run_cases

    records = [{**asdict(c), "id": c.id, "dist": str(written / c.id), "ref": str(written / f"{c.id}.ref.pt")}
               for c in CASES]
    return run_cases(records, tmp_path_factory.mktemp("ranks"), load_case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_megatron_core_loads_it_and_logits_equal_hf(case: Case, loaded) -> None:
    result = loaded[case.id]
    assert_compared(result)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_back_to_hf_is_bitwise(case: Case, written, tmp_path) -> None:
    hf, back = written / f"hf-{case.id}", tmp_path / "back"
    assert_back_to_hf_bitwise(written / case.id, hf, back, case.family)


def _boxes(where: Path) -> dict[str, Any]:
    """Key -> (global shape, dtype, sorted chunks) of every tensor, or "bytes" for an object."""
    out: dict[str, Any] = {}
    for key, md in FileSystemReader(str(where)).read_metadata().state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            out[key] = (list(md.size), md.properties.dtype,
                        sorted((list(c.offsets), list(c.sizes)) for c in md.chunks))
        else:
            assert isinstance(md, BytesStorageMetadata)
            out[key] = "bytes"
    return out


def test_metadata_is_what_megatron_cores_save_writes(tmp_path) -> None:
    """Against megatron-core's own `dist_checkpointing.save` of the same model at TP 2 x PP 2
    (the harness of test_megatron_dist_read): every key, global shape, dtype and chunk."""
    import megatron.core.models.gpt  # noqa: F401
    from mcore_ranks import save_dist_group

    shape = {**SHAPES["g4x2"]}
    records = []
    for family, tie in (("qwen2", False), ("qwen3", True)):
        tiny_model(family, tie=tie, **shape).save_pretrained(tmp_path / family / "hf")
        convert(tmp_path / family / "hf", tmp_path / family / "legacy", to="megatron",
                layout=MegatronLayout(tp=2, pp=2))
        convert(tmp_path / family / "hf", tmp_path / family / "ours", to="megatron",
                layout=MegatronLayout(tp=2, pp=2, ckpt_format="torch_dist"))
        records.append({"dir": str(tmp_path / family / "legacy"), "dist": str(tmp_path / family / "mcore"),
                        "tp": 2, "pp": 2, "vpp": None, "te": False})
    (tmp_path / "cases.json").write_text(json.dumps(records))
    spawn(save_dist_group, 4, str(tmp_path / "cases.json"), timeout_s=240, method="fork")
    for family in ("qwen2", "qwen3"):
        ours = _boxes(tmp_path / family / "ours" / "iter_0000001")
        theirs = _boxes(tmp_path / family / "mcore" / "iter_0000001")
        # and the final norm's object, which megatron-core asks for where TE is installed (keys.FINAL_NORM)
        assert sorted(set(ours) - set(theirs)) == ["decoder.final_layernorm._extra_state/shard_0_1"]
        assert set(theirs) <= set(ours) and ours["decoder.final_layernorm._extra_state/shard_0_1"] == "bytes"
        for key in theirs:
            assert ours[key] == theirs[key], key
        common = torch.load(tmp_path / family / "ours" / "iter_0000001" / "common.pt", weights_only=False)
        assert common["content_metadata"] == W.CONTENT_METADATA
        assert (common["checkpoint_version"], common["iteration"]) == (3.0, 1)
        # The args Megatron-LM checks (check_checkpoint_args) and takes (--use-checkpoint-args):
        # those of the legacy rank files, which megatron-core builds its model from in the other tests.
        legacy = load_rank_file(next((tmp_path / family / "legacy").rglob("model_optim_rng.pt")))["args"]
        assert vars(common["args"]) == {**vars(legacy), "ckpt_format": "torch_dist"}
        assert common["args"].padded_vocab_size == 256 and common["args"].num_query_groups == 4


def test_memory_holds_one_layer_at_a_time(tmp_path, monkeypatch) -> None:
    """The boxes the writer hands to DCP's FileSystemWriter are released as it writes them: at
    no point do live boxes exceed one layer's tensors plus the embedding and head."""
    hf = tmp_path / "hf"
    model = tiny_model("llama", tie=False, **{**SHAPES["g4x2"], "num_hidden_layers": 6})
    model.save_pretrained(hf)
    live: list[weakref.ref] = []
    peak = [0]
    resolve = W._LazyPlanner.resolve_data

    def tracked(self, item):  # noqa: ANN001, ANN202
        data = resolve(self, item)
        if isinstance(data, torch.Tensor):
            live.append(weakref.ref(data))
            peak[0] = max(peak[0], sum(t.nbytes for r in live if (t := r()) is not None))
        return data

    monkeypatch.setattr(W._LazyPlanner, "resolve_data", tracked)
    assert cli(hf, tmp_path / "dist", "--to", "megatron", "--ckpt-format", "torch_dist") == 0
    tensors = read_tensors(hf)
    layer = sum(t.nbytes for k, t in tensors.items() if ".layers.0." in k)
    ends = 2 * 256 * model.config.hidden_size * 4  # embedding and head, padded to 256 rows, fp32
    total = sum(t.nbytes for t in tensors.values())
    assert live and peak[0] <= layer + ends < total / 2, (peak[0], layer, ends, total)


@pytest.mark.parametrize("spec", ["local", "te"])
def test_torch_to_torch_dist_to_torch_is_bitwise(tmp_path, spec: str) -> None:
    hf = tmp_path / "hf"
    tiny_model("qwen2", tie=False, **SHAPES["g2x8"]).save_pretrained(hf)
    layout = ("--tp", 2, "--pp", 2, "--layer-spec", spec)
    assert cli(hf, tmp_path / "torch", "--to", "megatron", *layout) == 0
    assert cli(tmp_path / "torch", tmp_path / "dist", "--to", "megatron", *layout,
               "--ckpt-format", "torch_dist") == 0
    assert (tmp_path / "dist" / "iter_0000001" / ".metadata").is_file()
    assert cli(tmp_path / "dist", tmp_path / "back", "--to", "megatron", *layout,
               "--ckpt-format", "torch") == 0
    def rank_files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("model_optim_rng.pt"))

    files = rank_files(tmp_path / "torch")
    assert len(files) == 4 and files == rank_files(tmp_path / "back")
    for name in files:
        a, b = load_rank_file(tmp_path / "torch" / name), load_rank_file(tmp_path / "back" / name)
        assert vars(a["args"]) == vars(b["args"])
        assert a["model"].keys() == b["model"].keys()
        for key, t in a["model"].items():
            assert (t is None and b["model"][key] is None) or torch.equal(t, b["model"][key]), key
    assert json.loads((tmp_path / "torch" / "hf_source.json").read_text()) == \
        json.loads((tmp_path / "back" / "hf_source.json").read_text())


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> Path:
    hf = tmp_path_factory.mktemp("small") / "hf"
    tiny_model("llama", tie=False, **SHAPES["g4x2"]).save_pretrained(hf)
    return hf


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    return err


def test_existing_destination_is_refused_and_kept(small_hf, tmp_path, capsys) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert cli(small_hf, dst, "--to", "megatron", "--ckpt-format", "torch_dist") == 2
    _one_line(capsys, str(dst), "already exists")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert cli(small_hf, dst, "--to", "megatron", "--ckpt-format", "torch_dist", "--force") == 0
    assert (dst / "iter_0000001" / ".metadata").is_file() and not (dst / "keep.txt").exists()


@pytest.mark.parametrize("parent", ["missing", "a-file"])
def test_bad_parent_is_one_line(small_hf, tmp_path, capsys, parent: str) -> None:
    if parent == "a-file":
        (tmp_path / parent).write_text("")
    capsys.readouterr()
    assert cli(small_hf, tmp_path / parent / "dst", "--to", "megatron", "--ckpt-format", "torch_dist") == 2
    _one_line(capsys, str(tmp_path / parent), "no such directory")
    assert [p.name for p in tmp_path.iterdir()] == (["a-file"] if parent == "a-file" else [])


@pytest.mark.parametrize(("flags", "needles"), [
    (["--to", "hf", "--ckpt-format", "torch_dist"], ["--ckpt-format", "--to megatron"]),
    (["--to", "megatron", "--ckpt-format", "torch_dist", "--tp", "3"], ["--tp 3"]),
])
def test_refusals_are_one_line_and_write_nothing(small_hf, tmp_path, capsys, flags, needles) -> None:
    capsys.readouterr()
    assert cli(small_hf, tmp_path / "dst", *flags) == 2
    _one_line(capsys, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_nothing(small_hf, tmp_path, monkeypatch) -> None:
    """A box that cannot be made halfway through the .distcp file: no DST, no temporary directory."""
    calls = [0]
    resolve = W._LazyPlanner.resolve_data

    def failing(self, item):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == 20:
            raise OSError("disk went away")
        return resolve(self, item)

    monkeypatch.setattr(W._LazyPlanner, "resolve_data", failing)
    with pytest.raises(OSError, match="disk went away"):
        convert(small_hf, tmp_path / "dst", to="megatron", layout=MegatronLayout(ckpt_format="torch_dist"))
    assert calls[0] == 20 and list(tmp_path.iterdir()) == []


def test_reads_back_from_a_copy_without_the_family_record(written, tmp_path) -> None:
    """Without hf_source.json the family is --family, as for megatron-core's own (Qwen2's args fit
    Qwen v1 as well, so the reader alone would refuse them, naming both)."""
    case = CASES[0]
    shutil.copytree(written / case.id, tmp_path / "dist")
    (tmp_path / "dist" / "hf_source.json").unlink()
    assert cli(tmp_path / "dist", tmp_path / "back", "--to", "hf", "--family", case.family) == 0
    assert_bitwise(read_tensors(written / f"hf-{case.id}"), read_tensors(tmp_path / "back"))


@pytest.mark.parametrize("shape", ["g4x2", "g2x8"])
def test_fused_boxes_are_cut_from_the_parts_as_from_the_whole_tensor(shape) -> None:
    """Each TP box of linear_qkv and linear_fc1, copied out of the canonical parts without
    building the fused tensor, equals the same rows of the whole fused tensor, at every TP the
    query groups allow (1, 2 and, with 4 groups, 4)."""
    from reference.converters.megatron import stage as S
    from reference.converters.megatron.keys import KeyTable
    from reference.families.registry import FAMILIES

    spec = FAMILIES["llama"].read(tiny_model("llama", **SHAPES[shape]).config.to_dict(), "llama")
    d, h = spec.head_dim, spec.hidden_size
    rows = {"q": spec.num_heads * d, "k": spec.num_kv_heads * d, "v": spec.num_kv_heads * d,
            "gate": spec.intermediate_size, "up": spec.intermediate_size}
    fused = [s for s in S.slots(spec, KeyTable("local"), S.Stage(0, 0, 1, True, True))
             if isinstance(s.rule.split, W.Fused) and s.key.endswith(".weight")]
    assert {s.key.split(".")[-2] for s in fused} == {"linear_qkv", "linear_fc1"}
    for slot in fused:
        parts = [torch.randn(rows[n.split(".")[-2]], h) for n in slot.sources]
        whole = S.shard(slot.rule.split, parts, spec, 1, 0, 0)
        labels, _ = W._labels([p.shape[0] for p in parts])
        order = S.shard(slot.rule.split, labels, spec, 1, 0, 0)
        for tp in (t for t in (1, 2, 4) if spec.num_kv_heads % t == 0):
            boxes = W.tp_boxes(slot.rule.split, [p.shape[0] for p in parts], whole.shape, spec, tp)
            assert sum(sizes[0] for _, sizes in boxes) == whole.shape[0]
            for (start, _), (n, _) in boxes:
                box = W.fused_rows(parts, order, start, n)
                assert torch.equal(box, whole[start:start + n]), (slot.key, tp)
