"""`reference generate MODEL --prompt TEXT`: prints stream_generate's text with the directory's
own tokenizer; a missing directory or tokenizer is one line, exit 2."""

from __future__ import annotations

import pytest
from test_cli import reference
from test_stream_generate import VOCAB, tokenizer

from reference.modeling import UnifiedForCausalLM
from reference.tiny import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "model"
    tiny_model("llama", vocab_size=VOCAB, pad_token_id=0, eos_token_id=1).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_prints_what_stream_generate_gives(model_dir) -> None:
    run = reference("generate", str(model_dir), "--prompt", "héllo wörld", "--max-new-tokens", "12")
    assert run.returncode == 0, run.stderr
    model = UnifiedForCausalLM.from_pretrained(model_dir)
    want = "".join(p[0] for p in model.stream_generate(text="héllo wörld", tokenizer=tokenizer(),
                                                       max_new_tokens=12))
    assert want and run.stdout == want + "\n"
    two = reference("generate", str(model_dir), "--prompt", "héllo wörld", "--max-new-tokens", "12",
                    "--devices", "cpu", "cpu")
    assert two.returncode == 0 and two.stdout == run.stdout


def test_a_missing_directory_or_tokenizer_is_one_line(model_dir, tmp_path) -> None:
    missing = reference("generate", str(tmp_path / "nowhere"), "--prompt", "x")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "no such model directory" in missing.stderr
    tiny_model("llama").save_pretrained(tmp_path / "bare")
    bare = reference("generate", str(tmp_path / "bare"), "--prompt", "x")
    assert bare.returncode == 2 and bare.stderr.strip().count("\n") == 0
    assert "no tokenizer" in bare.stderr
    bad = reference("generate", str(model_dir), "--prompt", "x", "--devices", "nodevice")
    assert bad.returncode == 2 and "--devices" in bad.stderr and bad.stderr.strip().count("\n") == 0
