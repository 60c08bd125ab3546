"""`reference convert` to and from Megatron through the CLI: the layout on disk, the args,
resharding, `--to llama`, streaming, and every error as one line with DST absent."""

from __future__ import annotations

import json
import shutil
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from harness import assert_bitwise, read_tensors
from transformers import AutoModelForCausalLM

from reference.cli import main
from reference.tiny import logits, save_tiny, tiny_model

GQA = {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 48, "head_dim": 12,
       "intermediate_size": 64, "num_hidden_layers": 4}
ITER = "iter_0000001"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen2": save_tiny("qwen2", root / "qwen2", num_hidden_layers=4),
        "qwen3": save_tiny("qwen3", root / "qwen3", tie=True, num_hidden_layers=4),
        "llama": save_tiny("llama", root / "llama", **GQA),
    }


def convert(*args: object) -> None:
    assert main(["convert", *map(str, args)]) == 0


def fails(capsys, args: list[object], *needles: str) -> str:
    capsys.readouterr()  # drop what building the models printed
    assert main(["convert", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def rank_file(ckpt: Path, tp: int, pp: int | None = None) -> Path:
    name = f"mp_rank_{tp:02d}" + ("" if pp is None else f"_{pp:03d}")
    return ckpt / ITER / name / "model_optim_rng.pt"


def test_layout_and_args_on_disk(models, tmp_path) -> None:
    mg = tmp_path / "mg"
    convert(models["qwen2"], mg, "--to", "megatron", "--tp", "2", "--pp", "2")
    assert (mg / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in (mg / ITER).iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert json.loads((mg / "hf_source.json").read_text())["model_type"] == "qwen2"
    for path in sorted(mg.glob("iter_*/mp_rank_*/*.pt")):  # valid zips, CRCs included (unzip -t)
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None, f"{path}: bad CRC in the zip"
    first = torch.load(rank_file(mg, 0, 0), weights_only=False)
    last = torch.load(rank_file(mg, 1, 1), weights_only=False)
    assert sorted(first) == ["args", "checkpoint_version", "iteration", "model"]
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 1
    args = first["args"]
    assert isinstance(args, Namespace)
    plain = (bool, int, float, str, type(None), torch.dtype)
    assert all(isinstance(v, plain) for v in vars(args).values()), vars(args)
    want = {"num_layers": 4, "hidden_size": 72, "ffn_hidden_size": 112, "num_attention_heads": 6,
            "group_query_attention": True, "num_query_groups": 2, "kv_channels": 16,
            "max_position_embeddings": 64, "position_embedding_type": "rope", "rotary_base": 10000,
            "rotary_percent": 1.0, "use_rope_scaling": False, "norm_epsilon": 1e-5, "layernorm_epsilon": 1e-5,
            "apply_layernorm_1p": False, "layernorm_zero_centered_gamma": False,
            "normalization": "RMSNorm", "swiglu": True, "add_qkv_bias": True, "add_bias_linear": False,
            "qk_layernorm": False, "untie_embeddings_and_output_weights": True, "vocab_size": 250,
            "padded_vocab_size": 256, "make_vocab_size_divisible_by": 128,
            "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
            "virtual_pipeline_model_parallel_size": None, "transformer_impl": "local",
            "params_dtype": torch.float32, "bf16": False, "fp16": False, "ckpt_format": "torch"}
    assert {k: getattr(args, k) for k in want} == want
    layer0 = {k for k in first["model"] if k.startswith("decoder.layers.0.")}
    assert layer0 == {f"decoder.layers.0.{k}" for k in (
        "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
        "self_attention.linear_qkv._extra_state", "self_attention.linear_proj.weight",
        "self_attention.linear_proj._extra_state", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
        "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state")}
    assert first["model"]["embedding.word_embeddings.weight"].shape == (128, 72)  # 256 / tp
    qkv = first["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (80, 72)  # one query group: (3 + 1 + 1) heads x 16
    assert "decoder.layers.2.input_layernorm.weight" not in first["model"]  # layers restart per stage
    assert last["model"]["output_layer.weight"].shape == (128, 72)
    assert torch.count_nonzero(last["model"]["output_layer.weight"][-6:]) == 0  # rows 250..255: padding
    assert last["model"]["output_layer._extra_state"] is None


def test_te_layout_keys(models, tmp_path) -> None:
    mg = tmp_path / "mg"
    convert(models["qwen3"], mg, "--to", "megatron", "--layer-spec", "te")
    state = torch.load(rank_file(mg, 0), weights_only=False)
    assert state["args"].transformer_impl == "transformer_engine"
    model = state["model"]
    layer0 = {k.removeprefix("decoder.layers.0.") for k in model if k.startswith("decoder.layers.0.")}
    assert layer0 == {
        "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias", "self_attention.linear_qkv._extra_state",
        "self_attention.core_attention._extra_state", "self_attention.q_layernorm.weight",
        "self_attention.q_layernorm._extra_state", "self_attention.k_layernorm.weight",
        "self_attention.k_layernorm._extra_state", "self_attention.linear_proj.weight",
        "self_attention.linear_proj.bias", "self_attention.linear_proj._extra_state",
        "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
        "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
        "mlp.linear_fc2._extra_state"}
    te = model["decoder.layers.0.self_attention.linear_qkv._extra_state"]
    assert te.dtype == torch.uint8 and te.numel() == 0  # TransformerEngine's "no FP8 state"
    assert "output_layer.weight" not in model and model["output_layer._extra_state"] is None  # tied, PP 1
    back = tmp_path / "back"
    convert(mg, back, "--to", "hf")
    assert_bitwise(read_tensors(models["qwen3"]), read_tensors(back))


RESHARDS = [((2, 2, None, "local"), (4, 1, None, "local")), ((1, 2, 2, "local"), (2, 1, None, "te")),
            ((4, 1, None, "te"), (1, 2, 2, "local")), ((2, 2, 2, "local"), (1, 1, None, "local"))]


@pytest.mark.parametrize(("a", "b"), RESHARDS, ids=lambda x: "tp{}pp{}vpp{}-{}".format(*x))
def test_reshard_then_back_to_hf_is_bitwise(models, tmp_path, a, b) -> None:
    def layout(tp, pp, vpp, spec):
        return ["--tp", tp, "--pp", pp, "--layer-spec", spec, *(["--vpp", vpp] if vpp else [])]

    convert(models["llama"], tmp_path / "a", "--to", "megatron", *layout(*a))
    convert(tmp_path / "a", tmp_path / "b", "--to", "megatron", *layout(*b))
    args = torch.load(next((tmp_path / "b" / ITER).glob("*/*.pt")), weights_only=False)["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size) == b[:3]
    convert(tmp_path / "b", tmp_path / "hf", "--to", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    original = json.loads((models["llama"] / "config.json").read_text())
    assert config == original  # every field, carried through both Megatron hops
    assert_bitwise(read_tensors(models["llama"]), read_tensors(tmp_path / "hf"))


@pytest.mark.parametrize(("family", "fits"), [("llama", "llama, mistral, phi3, internlm2, granite"),
                                              ("qwen2", "qwen2, qwen"), ("qwen3", None)])
def test_family_from_features_when_not_recorded(models, tmp_path, capsys, family, fits) -> None:
    """A checkpoint Megatron-LM wrote itself has no hf_source.json: the one family whose features
    are exactly the args' takes it; args several families fit are refused, naming them, until
    --family picks one."""
    convert(models[family], tmp_path / "mg", "--to", "megatron")
    (tmp_path / "mg" / "hf_source.json").unlink()
    if fits:
        err = fails(capsys, [tmp_path / "mg", tmp_path / "hf", "--to", "hf"], f"({fits})", "--family NAME")
        assert "mp_rank_00" in err and not (tmp_path / "hf").exists()
        convert(tmp_path / "mg", tmp_path / "hf", "--to", "hf", "--family", family)
    else:
        convert(tmp_path / "mg", tmp_path / "hf", "--to", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    assert_bitwise(read_tensors(models[family]), read_tensors(tmp_path / "hf"))


def megatron_lm_016_args(mg: Path, **changes: object) -> None:
    """Make the checkpoint look saved by Megatron-LM 0.16 itself: no hf_source.json, and its norm
    flags under the TransformerConfig names 0.16 saves them by (`--norm-epsilon` as
    layernorm_epsilon, `--apply-layernorm-1p` as layernorm_zero_centered_gamma), then `changes`."""
    (mg / "hf_source.json").unlink()
    path = rank_file(mg, 0)
    state = torch.load(path, weights_only=False)
    del state["args"].norm_epsilon, state["args"].apply_layernorm_1p
    for name, value in changes.items():
        setattr(state["args"], name, value)
    torch.save(state, path)


def test_norm_eps_under_megatron_lm_016_names(tmp_path) -> None:
    """Megatron-LM 0.16 saves --norm-epsilon as args.layernorm_epsilon (earlier releases as
    norm_epsilon): both are written, and a checkpoint with only the new name reads back its eps,
    not the 1e-5 default (Qwen's 1e-6 was silently read as 1e-5)."""
    hf = save_tiny("qwen3", tmp_path / "qwen3", tie=True, rms_norm_eps=1e-6)
    convert(hf, tmp_path / "mg", "--to", "megatron")
    args = torch.load(rank_file(tmp_path / "mg", 0), weights_only=False)["args"]
    assert (args.norm_epsilon, args.layernorm_epsilon) == (1e-6, 1e-6)
    assert (args.apply_layernorm_1p, args.layernorm_zero_centered_gamma) == (False, False)
    megatron_lm_016_args(tmp_path / "mg")
    convert(tmp_path / "mg", tmp_path / "hf", "--to", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert_bitwise(read_tensors(hf), read_tensors(tmp_path / "hf"))


@pytest.mark.parametrize(("changes", "needles"), [
    ({"norm_epsilon": 1e-5}, ["norm_epsilon=1e-05 and layernorm_epsilon=1e-06 differ"]),
    ({"layernorm_zero_centered_gamma": True}, ["layernorm_zero_centered_gamma)=True is not read"]),
])
def test_megatron_lm_016_norm_args_refused(tmp_path, capsys, changes, needles) -> None:
    hf = save_tiny("qwen3", tmp_path / "qwen3", tie=True, rms_norm_eps=1e-6)
    convert(hf, tmp_path / "mg", "--to", "megatron")
    megatron_lm_016_args(tmp_path / "mg", **changes)
    fails(capsys, [tmp_path / "mg", tmp_path / "hf", "--to", "hf"], "mp_rank_00", *needles)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("given", "needle"), [
    ("olmo2", "--family olmo2: the args in"),  # OLMo2 norms q/k and after each block: not these args
    ("nosuch", "unknown model family 'nosuch'"),
])
def test_family_flag_that_does_not_fit_is_refused(models, tmp_path, capsys, given, needle) -> None:
    convert(models["llama"], tmp_path / "mg", "--to", "megatron")
    (tmp_path / "mg" / "hf_source.json").unlink()
    fails(capsys, [tmp_path / "mg", tmp_path / "hf", "--to", "hf", "--family", given], needle)
    assert not (tmp_path / "hf").exists()


def test_family_flag_against_the_record_and_an_hf_source(models, tmp_path, capsys) -> None:
    """The record wins; a --family that contradicts it, or given for an HF source, is refused."""
    convert(models["llama"], tmp_path / "mg", "--to", "megatron")
    fails(capsys, [tmp_path / "mg", tmp_path / "hf", "--to", "hf", "--family", "mistral"],
          "--family mistral", "hf_source.json records llama")
    convert(tmp_path / "mg", tmp_path / "hf", "--to", "hf", "--family", "llama")  # agreeing: fine
    fails(capsys, [models["llama"], tmp_path / "x", "--to", "qwen2", "--family", "llama"],
          "--family llama: applies only to a Megatron-LM checkpoint")


def test_uneven_pipeline_stages(models, tmp_path) -> None:
    mg = tmp_path / "mg"
    convert(models["llama"], mg, "--to", "megatron", "--pp", "2", "--pp-layers", "1,3")
    first = torch.load(rank_file(mg, 0, 0), weights_only=False)
    assert first["args"].pipeline_model_parallel_layout == "Et*1|t*3L"
    assert {k.split(".")[2] for k in first["model"] if k.startswith("decoder.layers.")} == {"0"}
    convert(mg, tmp_path / "hf", "--to", "hf")
    assert_bitwise(read_tensors(models["llama"]), read_tensors(tmp_path / "hf"))


def test_dtype_cast_is_recorded(models, tmp_path) -> None:
    convert(models["qwen2"], tmp_path / "mg", "--to", "megatron", "--tp", "2", "--dtype", "bfloat16")
    state = torch.load(rank_file(tmp_path / "mg", 1), weights_only=False)
    assert state["args"].bf16 and state["args"].params_dtype == torch.bfloat16
    assert {t.dtype for t in state["model"].values() if t is not None} == {torch.bfloat16}
    convert(tmp_path / "mg", tmp_path / "hf", "--to", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    want = {k: v.to(torch.bfloat16) for k, v in read_tensors(models["qwen2"]).items()}
    assert_bitwise(want, read_tensors(tmp_path / "hf"))


def test_to_llama_where_expressible(models, tmp_path) -> None:
    convert(models["qwen2"], tmp_path / "mg", "--to", "megatron", "--tp", "2")
    convert(tmp_path / "mg", tmp_path / "llama", "--to", "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="eager")
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(model), logits(tiny_model("qwen2", num_hidden_layers=4)))


def test_streaming_holds_one_tensor_at_a_time(models, tmp_path, monkeypatch) -> None:
    """Each rank file is written tensor by tensor: when a Megatron tensor is written, the one
    written before it and the source tensors it was cut from are gone; cutting one holds at
    most q, k and v."""
    import weakref

    from reference.converters.megatron import write
    from reference.converters.megatron.torch_file import TorchFile

    sources: list[weakref.ref] = []  # the full source tensors of every Megatron tensor cut so far
    now: list[weakref.ref] = []  # those of the one being cut
    written: list[weakref.ref] = []
    most = [0]
    shard_rows, write_tensor, finish = write.S.shard_rows, TorchFile.tensor, TorchFile.finish

    def tracked(split, parts, *args):  # noqa: ANN001, ANN202
        now[:] = [weakref.ref(p) for p in parts if not p.is_meta]
        sources.extend(now)
        most[0] = max(most[0], sum(r() is not None for r in sources))
        return shard_rows(split, parts, *args)

    def tensor(self, x):  # noqa: ANN001, ANN202
        assert all(r() is None for r in written), "a written tensor outlives its record"
        earlier = [r for r in sources if not any(r is n for n in now)]
        assert all(r() is None for r in earlier), "an earlier source tensor is alive"
        written.append(weakref.ref(x))
        return write_tensor(self, x)

    def finished(self, state):  # noqa: ANN001, ANN202
        files.append(state)
        return finish(self, state)

    files: list[dict] = []
    monkeypatch.setattr(write.S, "shard_rows", tracked)
    monkeypatch.setattr(TorchFile, "tensor", tensor)
    monkeypatch.setattr(TorchFile, "finish", finished)
    convert(models["llama"], tmp_path / "mg", "--to", "megatron", "--tp", "2", "--pp", "2")
    assert len(files) == 4 and len(written) > 4 and most[0] == 3


def test_source_truncated_while_writing(models, tmp_path) -> None:
    """The writer maps source tensors rather than reading them: a source file that shrinks
    under it is still one line naming the file, and DST does not appear."""
    import os

    from reference.converters import convert as convert_api
    from reference.errors import InputError

    src = tmp_path / "src"
    shutil.copytree(models["llama"], src)
    shard = src / "model.safetensors"

    def shrink(done: int, total: int) -> None:  # after the first tensor is cut
        if shard.stat().st_size > 1024:
            os.truncate(shard, 1024)

    from reference.converters.megatron import MegatronLayout

    with pytest.raises(InputError, match=f"{shard}: truncated while reading a tensor"):
        convert_api(src, tmp_path / "mg", to="megatron", layout=MegatronLayout(tp=2, pp=2), progress=shrink)
    assert not (tmp_path / "mg").exists()


# --- errors: one line naming the field or file, exit 2, nothing written ---------------------


@pytest.mark.parametrize(("flags", "needles"), [
    (["--tp", "4"], ["--tp 4", "num_attention_heads 6"]),
    (["--tp", "3"], ["--tp 3", "num_query_groups", "2"]),
    (["--pp", "3"], ["num_layers 4", "--pp-layers"]),
    (["--pp", "2", "--pp-layers", "1,2"], ["--pp-layers 1,2", "num_layers 4"]),
    (["--vpp", "2"], ["--vpp 2"]),
    (["--pp", "2", "--vpp", "4"], ["num_layers 4", "8 pipeline stages"]),
], ids=["tp-heads", "tp-groups", "layers", "pp-layers", "vpp-without-pp", "vpp-layers"])
def test_bad_layout(models, tmp_path, capsys, flags, needles) -> None:
    fails(capsys, [models["qwen2"], tmp_path / "mg", "--to", "megatron", *flags], *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tp_not_dividing_ffn(tmp_path, capsys) -> None:
    src = save_tiny("llama", tmp_path / "src", intermediate_size=113)
    fails(capsys, [src, tmp_path / "mg", "--to", "megatron", "--tp", "2"], "ffn_hidden_size", "113")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(("family", "overrides", "needle"), [
    ("gemma", {}, "hidden_act"),
    ("mistral", {"sliding_window": 8}, "sliding_window"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_parameters"),
])
def test_inexpressible_is_refused(tmp_path, capsys, family, overrides, needle) -> None:
    src = save_tiny(family, tmp_path / "src", **overrides)
    fails(capsys, [src, tmp_path / "mg", "--to", "megatron"], "megatron cannot express", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_qk_norm_cannot_go_to_llama(models, tmp_path, capsys) -> None:
    convert(models["qwen3"], tmp_path / "mg", "--to", "megatron")
    fails(capsys, [tmp_path / "mg", tmp_path / "llama", "--to", "llama"], "qk_norm")
    assert not (tmp_path / "llama").exists()


@pytest.fixture
def pipelined(models, tmp_path) -> Path:
    mg = tmp_path / "mg"
    convert(models["qwen2"], mg, "--to", "megatron", "--tp", "2", "--pp", "2")
    return mg


def _edit(path: Path, change) -> None:
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def _every_file(mg: Path, change) -> None:
    for path in sorted((mg / ITER).glob("*/model_optim_rng.pt")):
        _edit(path, change)


def _missing(mg: Path) -> None:
    shutil.rmtree(mg / ITER / "mp_rank_01_001")


def _extra_rank(mg: Path) -> None:
    shutil.copytree(mg / ITER / "mp_rank_01_001", mg / ITER / "mp_rank_02_001")


def _ffn(mg: Path) -> None:
    _every_file(mg, lambda s: setattr(s["args"], "ffn_hidden_size", 128))


def _layers(mg: Path) -> None:
    _every_file(mg, lambda s: setattr(s["args"], "num_layers", 6))


def _one_file(mg: Path) -> None:
    _edit(mg / ITER / "mp_rank_01_000" / "model_optim_rng.pt",
          lambda s: setattr(s["args"], "rotary_base", 500000))


def _unknown_key(mg: Path) -> None:
    _edit(mg / ITER / "mp_rank_00_001" / "model_optim_rng.pt",
          lambda s: s["model"].update({"decoder.layers.0.mlp.experts.weight1": torch.zeros(2)}))


def _dropped_key(mg: Path) -> None:
    _edit(mg / ITER / "mp_rank_00_001" / "model_optim_rng.pt",
          lambda s: s["model"].pop("decoder.layers.1.self_attention.linear_qkv.bias"))


def _tracker(mg: Path) -> None:
    (mg / "latest_checkpointed_iteration.txt").write_text("latest\n")


@pytest.mark.parametrize(("damage", "needles"), [
    (_missing, ["mp_rank_01_001", "missing rank file"]),
    (_extra_rank, ["mp_rank_02_001", "do not imply"]),
    (_ffn, ["linear_fc1.weight", "has shape", "args imply"]),
    (_layers, ["mp_rank_00_000", "decoder.layers.2.", "the args imply it"]),
    (_one_file, ["mp_rank_01_000", "args differ"]),
    (_unknown_key, ["mp_rank_00_001", "decoder.layers.0.mlp.experts.weight1", "unknown"]),
    (_dropped_key, ["mp_rank_00_001", "decoder.layers.1.self_attention.linear_qkv.bias", "missing"]),
    (_tracker, ["latest_checkpointed_iteration.txt", "latest"]),
], ids=lambda x: getattr(x, "__name__", "")[1:] or None)
def test_damaged_checkpoint(pipelined, tmp_path, capsys, damage, needles) -> None:
    damage(pipelined)
    fails(capsys, [pipelined, tmp_path / "back", "--to", "hf"], *needles)
    assert not (tmp_path / "back").exists()
