"""gguf_header.read_header: the same metadata and tensor names as the gguf package's own reader."""

import struct

import pytest
from gguf import GGUFReader, GGUFValueType
from tiny import write_gguf

from peftcli.models.gguf_header import Array, GGUFError, read_header
from peftcli.models.sources import resolve


def _reference(path):
    """(metadata, tensor names) as gguf.GGUFReader reads them, arrays as their item type and length."""
    reader = GGUFReader(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the header's counts
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            metadata[key] = Array(int(field.types[1]) if len(field.types) > 1 else -1, len(field.data))
        else:
            metadata[key] = field.contents()
    return metadata, [t.name for t in reader.tensors]


ALL_TYPES = {
    "t.u8": (GGUFValueType.UINT8, 7),
    "t.i8": (GGUFValueType.INT8, -7),
    "t.u16": (GGUFValueType.UINT16, 700),
    "t.i16": (GGUFValueType.INT16, -700),
    "t.u32": (GGUFValueType.UINT32, 70000),
    "t.i32": (GGUFValueType.INT32, -70000),
    "t.f32": (GGUFValueType.FLOAT32, 0.5),
    "t.bool": (GGUFValueType.BOOL, True),
    "t.str": (GGUFValueType.STRING, "héllo"),
    "t.u64": (GGUFValueType.UINT64, 2**40),
    "t.i64": (GGUFValueType.INT64, -(2**40)),
    "t.f64": (GGUFValueType.FLOAT64, 0.25),
    "t.strings": (GGUFValueType.ARRAY, ["a", "", "ccc", "ünï"]),
    "t.ints": (GGUFValueType.ARRAY, [1, 2, 3]),
}


def test_every_value_type_as_the_gguf_package_reads_it(tmp_path):
    path = write_gguf(tmp_path / "all.gguf", ALL_TYPES)
    metadata, names = read_header(path)
    expected_metadata, expected_names = _reference(path)
    assert names == expected_names == ["token_embd.weight", "blk.0.attn_q.weight"]
    assert metadata == expected_metadata
    assert metadata["t.strings"] == Array(int(GGUFValueType.STRING), 4)
    assert metadata["t.str"] == "héllo" and metadata["t.i64"] == -(2**40)


def test_the_packaged_smollm2_file():
    source = resolve("smollm2-135m-instruct")
    path = f"{source.path}/{source.gguf_file}"
    metadata, names = read_header(path)
    assert (metadata, names) == _reference(path)
    assert metadata["tokenizer.ggml.tokens"].length == 49152  # stepped over, not read


def test_bad_files_are_gguf_errors(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", ALL_TYPES)
    data = open(path, "rb").read()
    cases = {
        "magic": b"GGML" + data[4:],
        "version 1": data[:4] + (1).to_bytes(4, "little") + data[8:],
        "truncated": data[:60],
    }
    for label, blob in cases.items():
        bad = tmp_path / f"{label}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(GGUFError):
            read_header(str(bad))


def _raw(entries: list[tuple[str, int, bytes]], tensors: list[str] = ()) -> bytes:
    """A GGUF v3 header by hand: (key, value type, packed value) entries, then tensor infos."""

    def string(text: bytes) -> bytes:
        return struct.pack("<Q", len(text)) + text

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(entries))
    for key, value_type, value in entries:
        out += string(key.encode()) + struct.pack("<I", value_type) + value
    for i, name in enumerate(tensors):  # 4 float32 each, one after the other
        out += string(name.encode()) + struct.pack("<IQ", 1, 4) + struct.pack("<IQ", 0, 16 * i)
    if not tensors:
        return out
    return out + bytes(-len(out) % 32) + bytes(16 * len(tensors))  # data aligned to 32


def test_what_transformers_refuses_is_a_gguf_error(tmp_path):
    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    ok = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")
    cases = {
        "duplicate key": [ok, ("a.b", 4, u32(1)), ("a.b", 4, u32(2))],
        "alignment not a power of two": [ok, ("general.alignment", 4, u32(24))],
        "alignment not u32": [ok, ("general.alignment", 8, struct.pack("<Q", 2) + b"32")],
        "invalid utf-8": [ok, ("general.name", 8, struct.pack("<Q", 2) + b"\xff\xfe")],
        "array past the end": [ok, ("a.c", 9, struct.pack("<IQ", 4, 1000) + u32(1))],
        "invalid utf-8 in an array": [ok, ("a.d", 9, struct.pack("<IQQ", 8, 1, 1) + b"\xff")],
    }
    good = tmp_path / "good.gguf"
    good.write_bytes(_raw([ok], ["a", "b"]))
    assert read_header(str(good)) == ({"general.architecture": "llama"}, ["a", "b"])
    (tmp_path / "partial download.gguf").write_bytes(good.read_bytes()[:-1])  # a download cut short
    cases["partial download"] = [ok]
    for label, entries in {**cases, "tensor named twice": [ok]}.items():
        path = tmp_path / f"{label}.gguf"
        if label != "partial download":
            path.write_bytes(_raw(entries, ["a", "a"] if label == "tensor named twice" else []))
        with pytest.raises(ValueError):  # GGUFError, or UnicodeDecodeError: both ValueErrors
            read_header(str(path))
