"""Runs on a GGUF base (like the packaged SmolLM2): the export keeps the base's own types tensor by tensor,
copies what the adapter left alone byte for byte, keeps the base's tokenizer keys, and an adapter-only file
is checked on the base file itself."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console
from tiny import save_gguf_base, save_lora_run

from peftcli.errors import UserError
from peftcli.export import run as export
from peftcli.export.quant import QUANTS
from peftcli.models.gguf_header import read_gguf


@pytest.fixture(scope="module", params=["q8_0", "q4_1"])
def gguf_run(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("gguf-base")
    base = save_gguf_base(root / "base.gguf", "llama", request.param)
    return base, save_lora_run(root / "run", base, target_modules=["q_proj", "v_proj"])


def test_default_export_keeps_the_base_types_and_bytes(gguf_run, tmp_path):
    """Unchanged tensors: the base's bytes. Changed ones: the base's type where it is 8-bit (q8_0), else
    q8_0 (requantized to 4 bits, the adapter's change would round away), said in a note."""
    base_path, run = gguf_run
    out = tmp_path / "model.gguf"
    console = Console(record=True, width=400)
    export.export_run(run, out, verify=False, console=console)  # q8_0 flips greedy choices of tiny models
    said = console.export_text().splitlines()
    base, ours = read_gguf(str(base_path), arrays=True), read_gguf(str(out), arrays=True)
    base_blob, our_blob = np.fromfile(base_path, np.uint8), np.fromfile(out, np.uint8)
    assert [t.name for t in ours.tensors] == [t.name for t in base.tensors]
    adapted = {f"blk.{i}.attn_{p}.weight" for i in range(2) for p in ("q", "v")}
    four_bit = base.tensor("blk.0.attn_q.weight").ggml_type == QUANTS["q4_1"]
    changed = set()
    for theirs, mine in zip(base.tensors, ours.tensors, strict=True):
        raised = four_bit and mine.name in adapted
        expected_type = QUANTS["q8_0"] if raised else theirs.ggml_type
        assert (mine.shape, mine.ggml_type) == (theirs.shape, expected_type), mine.name
        same = not raised and np.array_equal(
            base_blob[theirs.offset : theirs.offset + theirs.nbytes],
            our_blob[mine.offset : mine.offset + mine.nbytes],
        )
        if not same:
            changed.add(mine.name)
    # exactly the adapted projections changed; everything else is the base's bytes
    assert changed == adapted
    notes = [line for line in said if line.startswith("note: 4 adapted tensors written q8_0")]
    assert len(notes) == (1 if four_bit else 0), said
    tokenizer_keys = [k for k in base.metadata if k.startswith("tokenizer.ggml.")]
    assert all(ours.metadata[k] == base.metadata[k] for k in tokenizer_keys)
    assert ours.metadata["general.file_type"] == base.metadata.get("general.file_type")


def test_adapter_only_is_checked_on_the_base_file(tmp_path):
    base = save_gguf_base(tmp_path / "base.gguf", "llama", "f32")
    run = save_lora_run(tmp_path / "run", base)
    out = tmp_path / "lora.gguf"
    result = export.export_run(run, out, adapter_only=True, ollama=tmp_path / "ollama")
    assert result.verification.identical == 4, result.verification.summary()
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == ["FROM ../base.gguf", "ADAPTER ../lora.gguf"]


def test_a_lora_on_a_tied_head_is_refused_for_llamacpp(tmp_path):
    """A tied base file holds no output tensor: llama.cpp has nowhere to apply an lm_head LoRA."""
    base = save_gguf_base(tmp_path / "base.gguf", "llama", "f32", tie_word_embeddings=True)
    run = save_lora_run(tmp_path / "run", base, target_modules=["q_proj", "lm_head"])
    with pytest.raises(UserError, match="tied|shared"):
        export.export_run(run, tmp_path / "lora.gguf", adapter_only=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
