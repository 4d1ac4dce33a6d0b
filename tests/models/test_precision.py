"""models/precision.py: model.dtype auto follows the hardware; model.quantize auto follows the source."""

from __future__ import annotations

import pytest

from peftcli.models import precision


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv("PEFTCLI_BF16", raising=False)
    monkeypatch.setattr(precision.Path, "is_file", lambda self: False)  # no NVIDIA driver either


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512_bf16"}, "bfloat16"),
        ({"amx_bf16", "amx_tile"}, "bfloat16"),
        ({"avx2", "fma"}, "float32"),
    ],
)
def test_auto_dtype_follows_the_cpus_flags(monkeypatch, no_override, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    chosen = precision.resolve("auto", "auto", gguf=False, probe_cuda=False)
    assert chosen.dtype == expected
    assert chosen.dtype_reason.startswith("auto: ")
    if expected == "bfloat16":
        assert next(iter(flags & set(precision.BF16_CPU_FLAGS))) in chosen.dtype_reason


def test_the_environment_overrides_detection(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setenv("PEFTCLI_BF16", "0")
    assert precision.resolve("auto", "none", gguf=False).dtype == "float32"
    monkeypatch.setenv("PEFTCLI_BF16", "1")
    assert precision.resolve("auto", "none", gguf=False).dtype == "bfloat16"


def test_cpu_flags_reads_this_machine():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux: the flags line of /proc/cpuinfo
        assert any(flag.startswith(("sse", "neon", "fp", "avx")) for flag in flags)


def test_explicit_values_and_quantize_auto():
    chosen = precision.resolve("bfloat16", "int4", gguf=False)
    assert (chosen.dtype, chosen.quantize) == ("bfloat16", "int4")
    assert chosen.dtype_reason == "model.dtype" and chosen.quantize_reason == "model.quantize"
    assert precision.resolve("float32", "auto", gguf=True).quantize == "gguf"
    assert precision.resolve("float32", "auto", gguf=False).quantize == "none"
    assert "int4" in precision.resolve("float32", "int4", gguf=False).describe()
