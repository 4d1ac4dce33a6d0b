"""`peft export` end to end on tiny models, judged by llama.cpp itself (the xllamacpp binding): the file
loads, tokenizes like the run's tokenizer, renders the chat template alike and continues the probes like
peftcli."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import save_bpe_base, save_lora_run
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.errors import CheckFailed, UserError
from peftcli.export import run as export
from peftcli.models.gguf_header import read_gguf


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{arch: run dir} of a random LoRA (all linear layers) on a tiny llama and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("export")
    return {
        arch: save_lora_run(root / f"{arch}-run", save_bpe_base(root / arch, arch))
        for arch in ("llama", "gpt2")
    }


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_merged_model_answers_in_llamacpp_as_in_peftcli(runs, tmp_path, arch, quant):
    out = tmp_path / "model.gguf"
    result = export.export_run(runs[arch], out, quant=quant)
    check = result.verification
    assert out.is_file() and leftovers(tmp_path) == []
    # the tokenizer and the template agree exactly (failure() would say otherwise), no vocabulary warnings
    assert check.failure() is None and check.vocab_warnings == []
    assert all(r.their_ids == r.probe.ids for r in check.results)
    assert check.identical == 4, check.summary()
    gguf = read_gguf(str(out))
    assert gguf.metadata["general.architecture"] == arch
    matrices = [t for t in gguf.tensors if len(t.shape) == 2]
    assert {t.ggml_type for t in matrices} == {{"f32": 0, "f16": 1}[quant]}
    assert all(t.ggml_type == 0 for t in gguf.tensors if len(t.shape) == 1)  # norms and biases stay f32


def test_adapter_only_on_a_transformers_base(runs, tmp_path):
    out = tmp_path / "lora.gguf"
    result = export.export_run(runs["llama"], out, adapter_only=True)
    assert result.verification.identical == 4, result.verification.summary()
    gguf = read_gguf(str(out), arrays=True)
    assert gguf.metadata["general.type"] == "adapter" and gguf.metadata["adapter.type"] == "lora"
    assert gguf.metadata["adapter.lora.alpha"] == pytest.approx(8.0)  # scale 2 = alpha / r with r = 4
    names = {t.name for t in gguf.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    assert leftovers(tmp_path) == []  # the temporary base GGUF is gone too


def test_rslora_and_its_plain_equivalent_give_identical_llamacpp_outputs(tmp_path):
    """rsLoRA scales by alpha / sqrt(r); a plain LoRA with alpha * sqrt(r) / ... the same scale: the same
    factors must come out of llama.cpp alike, merged and as adapters."""
    base = save_bpe_base(tmp_path / "base", "llama")
    rs = save_lora_run(tmp_path / "rs", base, rank=4, alpha=8.0, use_rslora=True)  # scale 8 / 2 = 4
    plain = save_lora_run(tmp_path / "plain", base, rank=4, alpha=16.0)  # scale 16 / 4 = 4
    outputs = {}
    for name, run in (("rs", rs), ("plain", plain)):
        adapter = export.export_run(run, tmp_path / f"{name}.lora.gguf", adapter_only=True)
        merged = export.export_run(run, tmp_path / f"{name}.gguf", quant="f32")
        outputs[name] = (
            [r.theirs for r in adapter.verification.results],
            [r.theirs for r in merged.verification.results],
        )
        alpha = read_gguf(str(tmp_path / f"{name}.lora.gguf")).metadata["adapter.lora.alpha"]
        assert alpha == pytest.approx(16.0)  # rsLoRA's 8 * sqrt(4): llama.cpp divides by r
    assert outputs["rs"] == outputs["plain"]
    assert outputs["rs"][0] == outputs["rs"][1]  # and the adapter on the base answers like the merged file


def test_a_file_llamacpp_reads_differently_fails_and_leaves_nothing(runs, tmp_path, monkeypatch):
    """A layout fault (here: q/k rows left in transformers' rotary order) derails llama.cpp's answers: the
    check fails with exit code 1 and neither the file nor its temp file remains."""
    import peftcli.export.gguf as writer

    monkeypatch.setattr(writer, "to_llamacpp_rotary", lambda rows, heads: rows)
    out = tmp_path / "broken.gguf"
    with pytest.raises(CheckFailed, match="continues the probes differently"):
        export.export_run(runs["llama"], out, quant="f32")
    assert not out.exists() and leftovers(tmp_path) == []
    result = CliRunner().invoke(app, ["export", str(runs["llama"]), "--gguf", str(out), "--quant", "f32"])
    assert result.exit_code == 1 and "nothing written" in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_no_verify_writes_without_llamacpp(runs, tmp_path, monkeypatch):
    def no_llamacpp(*args, **kwargs):
        raise AssertionError("llama.cpp loaded despite --no-verify")

    monkeypatch.setattr("peftcli.export.llamacpp.LlamaCpp", no_llamacpp)
    out = tmp_path / "model.gguf"
    result = CliRunner().invoke(app, ["export", str(runs["gpt2"]), "--gguf", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "check: skipped" in result.stdout and out.is_file()
    assert {t.ggml_type for t in read_gguf(str(out)).tensors if len(t.shape) == 2} == {1}  # f16 by default


def test_refusals_come_before_anything_is_written(runs, tmp_path):
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists"):
        export.export_run(runs["llama"], existing)
    assert existing.read_bytes() == b"keep"
    with pytest.raises(UserError, match="--quant: unknown type 'q3_k'"):
        export.export_run(runs["llama"], tmp_path / "a.gguf", quant="q3_k")
    with pytest.raises(UserError, match="--quant must be f32, f16 or bf16"):
        export.export_run(runs["llama"], tmp_path / "b.gguf", quant="q8_0", adapter_only=True)
    with pytest.raises(UserError, match="does not exist"):
        export.export_run(runs["llama"], tmp_path / "no" / "such" / "c.gguf")
    with pytest.raises(UserError, match="GGUF base for FROM"):
        export.export_run(runs["llama"], tmp_path / "d.gguf", adapter_only=True, ollama=tmp_path / "ollama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.gguf"]


def test_cli_prints_the_agreement_and_writes_an_ollama_modelfile(runs, tmp_path):
    out = tmp_path / "model.gguf"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(runs["llama"]),
            "--gguf",
            str(out),
            "--quant",
            "f16",
            "--ollama",
            str(tmp_path / "ol"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "identical greedy continuations of 24 tokens" in result.stdout
    modelfile = (tmp_path / "ol" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ../model.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
