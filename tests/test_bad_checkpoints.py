"""Bad checkpoints: each is refused with one clear line naming the file or tensor and exit code 2,
before anything is read or allocated beyond the file's own size."""

import json
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refimpl
from refimpl.checkpoint import Checkpoint, SafetensorsFile
from refimpl.writer import make_checkpoint, write_safetensors
from tests.helpers import run_cli, run_main

TINY = refimpl.Config.preset("tiny")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    out = {"float": str(root / "float"), "fp8": str(root / "fp8"), "sharded": str(root / "sharded")}
    make_checkpoint(out["float"], TINY, seed=0)
    make_checkpoint(out["fp8"], TINY, seed=0, fp8=True)
    make_checkpoint(out["sharded"], TINY, seed=0, shards=3)
    return out


def copy(src, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    return dst


def read(path):
    """(header dict, data bytes) of a safetensors file, parsed here by hand."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), f.read()


def write(path, header, data, length=None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def arrays(ckpt_dir):
    ck = Checkpoint(ckpt_dir)
    return {n: np.array(ck.raw(n)) for n in ck.names()}


def refused(*args):
    """Run the CLI; it must exit 2 with one line `refimpl: error: ...` -> that line."""
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("refimpl: error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def info_refused(path):
    """`refimpl info --checkpoint path` (in this process): exit 2, one line -> that line."""
    rc, _, err = run_main("info", "--checkpoint", path)
    assert rc == 2 and err.startswith("refimpl: error: ") and err.count("\n") == 1, (rc, err)
    return err


def test_header_length_larger_than_the_file(good, tmp_path):
    d = copy(good["float"], tmp_path)
    f = os.path.join(d, "model.safetensors")
    header, data = read(f)
    write(f, header, data, length=10**15)
    assert "header length 1000000000000000 is larger than the file" in info_refused(d)


def test_truncated_data(good, tmp_path):
    d = copy(good["float"], tmp_path)
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as h:
        h.truncate(size - 100)
    msg = info_refused(d)
    assert "model.safetensors" in msg and "outside" in msg and "truncated" in msg


def test_offsets_overlapping(good, tmp_path):
    d = copy(good["float"], tmp_path)
    f = os.path.join(d, "model.safetensors")
    header, data = read(f)
    a = "model.layers.0.input_layernorm.weight"
    b = "model.layers.0.post_attention_layernorm.weight"  # same shape and dtype
    header[b]["data_offsets"] = header[a]["data_offsets"]
    write(f, header, data)
    msg = info_refused(d)
    assert "overlap" in msg and a in msg and b in msg


def test_offsets_outside_the_data(good, tmp_path):
    d = copy(good["float"], tmp_path)
    f = os.path.join(d, "model.safetensors")
    header, data = read(f)
    name = "model.norm.weight"
    n = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    header[name]["data_offsets"] = [len(data) + 8, len(data) + 8 + n]
    write(f, header, data)
    msg = info_refused(d)
    assert name in msg and "outside" in msg


def test_unknown_dtype(good, tmp_path):
    d = copy(good["float"], tmp_path)
    f = os.path.join(d, "model.safetensors")
    header, data = read(f)
    header["model.norm.weight"]["dtype"] = "F12"
    write(f, header, data)
    msg = info_refused(d)
    assert "model.norm.weight" in msg and "unknown dtype 'F12'" in msg


def test_scale_whose_shape_does_not_fit_its_weight(good, tmp_path):
    d = copy(good["fp8"], tmp_path)
    t = arrays(d)
    name = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"
    assert t[name].shape == (1, 1)
    t[name] = np.ones((2, 1), dtype=np.float32)
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    msg = info_refused(d)
    assert name in msg and "[2, 1]" in msg and "[1, 1]" in msg
    # load() checks scales up front too, not on first use
    with pytest.raises(refimpl.CheckpointError, match="weight_scale_inv has shape"):
        refimpl.load(d)


def test_index_naming_a_missing_shard(good, tmp_path):
    d = copy(good["sharded"], tmp_path)
    os.unlink(os.path.join(d, "model-00002-of-00003.safetensors"))
    msg = info_refused(d)
    assert "model-00002-of-00003.safetensors" in msg and "missing" in msg


def test_index_naming_a_missing_tensor(good, tmp_path):
    d = copy(good["sharded"], tmp_path)
    index_path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = "model-00001-of-00003.safetensors"
    json.dump(index, open(index_path, "w"))
    msg = info_refused(d)
    assert "model.layers.0.self_attn.ghost.weight is not in model-00001-of-00003.safetensors" in msg


def test_tensor_missing_from_the_checkpoint_is_named(good, tmp_path):
    d = copy(good["float"], tmp_path)
    t = arrays(d)
    del t["model.layers.1.self_attn.o_proj.weight"]
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    msg = info_refused(d)
    assert "tensor model.layers.1.self_attn.o_proj.weight is missing" in msg


@pytest.mark.parametrize("kind,name,bad", [
    ("float", "model.layers.1.self_attn.kv_b_proj.weight", np.nan),
    ("float", "model.layers.2.post_attention_layernorm.weight", np.inf),
    ("fp8", "model.layers.0.mlp.down_proj.weight_scale_inv", np.inf),
    ("fp8", "model.layers.0.self_attn.o_proj.weight", "nan-code"),
])
def test_nan_or_inf_in_a_weight_is_named_with_its_layer(good, tmp_path, kind, name, bad):
    d = copy(good[kind], tmp_path)
    t = arrays(d)
    a = t[name].copy()
    if bad == "nan-code":  # e4m3fn has no Inf; 0x7f is its NaN
        a.view(np.uint8).reshape(-1)[0] = 0x7F
    else:
        a.reshape(-1)[0] = bad
    t[name] = a
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    np.save(tmp_path / "t.npy", np.array([[1, 2, 3]]))
    layer = name.split(".")[2]
    msg = refused("logits", "--checkpoint", d, "--tokens", tmp_path / "t.npy", "--out", tmp_path / "o.npy")
    assert name in msg and f"(layer {layer})" in msg and "NaN or Inf" in msg
    assert not os.path.exists(tmp_path / "o.npy")


# ---- hypothesis: arbitrary headers are parsed or refused, never anything else ------------------

DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "I64", "U8", "BOOL", "F7", "", 3, None]
ints = st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**63, 2**70]), st.booleans(),
                 st.floats(allow_nan=True), st.none(), st.text(max_size=2))
entry = st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from(DTYPE_NAMES),
                           "shape": st.one_of(st.lists(ints, max_size=4), ints),
                           "data_offsets": st.one_of(st.lists(ints, max_size=3), ints)}),
    st.dictionaries(st.text(max_size=5), ints, max_size=3), ints, st.lists(ints, max_size=3))


def check_parsed_or_refused(blob: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            st_file = SafetensorsFile(path)
        except refimpl.CheckpointError as e:
            assert path in str(e) and "\n" not in str(e)
            return
        for name, (dtype, shape, _) in st_file.tensors.items():
            assert st_file.array(name).shape == shape  # reading stays inside the file


@given(header=st.dictionaries(st.text(max_size=8), entry, max_size=4),
       data=st.binary(max_size=600), lie=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_any_header_is_parsed_or_refused_with_a_checkpoint_error(header, data, lie):
    raw = json.dumps(header).encode()
    n = len(raw) if lie is None else lie
    check_parsed_or_refused(struct.pack("<Q", n) + raw + data)


@given(shapes=st.lists(st.lists(st.integers(0, 6), max_size=3), min_size=1, max_size=4),
       shift=st.lists(st.integers(-8, 8), min_size=8, max_size=8), cut=st.integers(0, 64))
def test_valid_looking_headers_with_shifted_offsets_or_cut_data(shapes, shift, cut):
    header, offset = {}, 0
    for k, shape in enumerate(shapes):
        size = int(np.prod(shape)) * 4
        header[f"t{k}"] = {"dtype": "F32", "shape": shape,
                           "data_offsets": [offset + shift[2 * k % 8], offset + size + shift[(2 * k + 1) % 8]]}
        offset += size
    raw = json.dumps(header).encode()
    data = bytes(max(offset - cut, 0))
    check_parsed_or_refused(struct.pack("<Q", len(raw)) + raw + data)


@given(blob=st.binary(max_size=64))
def test_arbitrary_bytes_are_refused(blob):
    check_parsed_or_refused(blob)


def test_deeply_nested_header_json_is_refused():
    raw = b"[" * 100_000 + b"]" * 100_000
    check_parsed_or_refused(struct.pack("<Q", len(raw)) + raw)


# ---- what the safetensors library refuses, refused too (issue 10) -------------------------------

def raw_header(path):
    """(raw header bytes, data bytes) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n), f.read()


def write_raw(path, raw, data, length=None):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def model_file(good, kind, tmp_path):
    d = copy(good[kind], tmp_path)
    return d, os.path.join(d, "model.safetensors")


@pytest.mark.parametrize("short", [1, 3, 7])
def test_header_length_a_few_bytes_short_of_the_padded_json(good, tmp_path, short):
    # the JSON still parses without its padding, but the data would be read `short` bytes early
    d, f = model_file(good, "float", tmp_path)
    raw, data = raw_header(f)
    raw = raw.rstrip(b" ") + b" " * 8
    write_raw(f, raw, data, length=len(raw) - short)
    msg = info_refused(d)
    assert "model.safetensors" in msg and f"{short} trailing bytes" in msg


def test_duplicate_tensor_key_in_the_header(good, tmp_path):
    d, f = model_file(good, "float", tmp_path)
    header, data = read(f)
    name = "model.norm.weight"
    entry = json.dumps(header[name])
    raw = json.dumps(header).replace(f'"{name}": {entry}', f'"{name}": {entry}, "{name}": {entry}')
    write_raw(f, raw.encode(), data)
    assert f"duplicate key '{name}'" in info_refused(d)


def test_hole_in_the_data_region(good, tmp_path):
    d, f = model_file(good, "float", tmp_path)
    header, data = read(f)
    first = min((h["data_offsets"][0], k) for k, h in header.items() if k != "__metadata__")[1]
    for k, h in header.items():  # every tensor moved 4 bytes on: 4 bytes before the first are no one's
        if k != "__metadata__":
            h["data_offsets"] = [h["data_offsets"][0] + 4, h["data_offsets"][1] + 4]
    write(f, header, bytes(4) + data)
    msg = info_refused(d)
    assert "bytes 0 to 4 of the data belong to no tensor" in msg and first in msg


def test_hole_between_tensors(good, tmp_path):
    d, f = model_file(good, "float", tmp_path)
    header, data = read(f)
    name = "model.layers.0.input_layernorm.weight"
    del header[name]  # its bytes stay in the data
    write(f, header, data)
    msg = info_refused(d)
    assert "belong to no tensor" in msg


def test_trailing_bytes_after_the_last_tensor(good, tmp_path):
    d, f = model_file(good, "float", tmp_path)
    header, data = read(f)
    write(f, header, data + b"\0" * 16)
    assert "16 trailing bytes after the last tensor" in info_refused(d)


def test_header_dtype_given_as_a_list(good, tmp_path):
    d, f = model_file(good, "float", tmp_path)
    header, data = read(f)
    header["model.norm.weight"]["dtype"] = ["F32"]
    write(f, header, data)
    assert "model.norm.weight: unknown dtype ['F32']" in info_refused(d)


@pytest.mark.parametrize("change, needle", [
    ({"dtype": "F32", "shape": [64], "data_offsets": [0, 256], "extra": 1}, "exactly dtype"),
    ({"dtype": "F32", "shape": [64.0], "data_offsets": [0, 256]}, "is not a list of at most 8 integers"),
    ({"dtype": "F32", "shape": [64], "data_offsets": [0.0, 256]}, "not two integers"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "is not a list of at most 8 integers"),
])
def test_entries_of_the_wrong_json_types(good, tmp_path, change, needle):
    d, f = model_file(good, "float", tmp_path)
    header, data = read(f)
    header["model.norm.weight"] = change
    write(f, header, data)
    assert needle in info_refused(d)


def test_metadata_must_be_strings(good, tmp_path):
    d, f = model_file(good, "float", tmp_path)
    header, data = read(f)
    header["__metadata__"] = {"format": ["pt"]}
    write(f, header, data)
    assert "__metadata__ must be an object of strings" in info_refused(d)


def test_nan_literal_in_the_header(good, tmp_path):
    d, f = model_file(good, "float", tmp_path)
    raw, data = raw_header(f)
    raw = raw.replace(b'"format":"pt"', b'"format":NaN')
    assert b"NaN" in raw
    write_raw(f, raw, data)
    assert "NaN is not a JSON number" in info_refused(d)


@pytest.mark.parametrize("dtype", ["I8", "U8", "BOOL"])
def test_fp8_weight_bytes_declared_as_another_one_byte_dtype(good, tmp_path, dtype):
    # the bytes are unchanged; only the header lies, so the scale would be silently dropped
    d, f = model_file(good, "fp8", tmp_path)
    header, data = read(f)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert header[name]["dtype"] == "F8_E4M3"
    header[name]["dtype"] = dtype
    write(f, header, data)
    msg = info_refused(d)
    assert f"{name} has a block scale but is stored as {dtype}" in msg
    assert "must be stored as F8_E4M3" in msg


@pytest.mark.parametrize("kind, name, dtype, role", [
    ("float", "model.layers.0.input_layernorm.weight", "I32", "norm weight"),
    ("float", "model.layers.1.self_attn.kv_a_layernorm.weight", "BOOL", "norm weight"),
    ("float", "model.layers.2.self_attn.o_proj.weight", "U8", "projection"),
    ("float", "model.layers.1.mlp.gate.e_score_correction_bias", "I32", "gate bias"),
    ("float", "model.layers.1.mlp.gate.weight", "I64", "router gate"),
    ("float", "model.embed_tokens.weight", "I16", "embedding"),
])
def test_tensors_stored_in_a_dtype_their_role_does_not_allow(good, tmp_path, kind, name, dtype, role):
    d = copy(good[kind], tmp_path)
    t = arrays(d)
    t[name] = np.ones(t[name].shape, dtype=refimpl.layout.DTYPES[dtype])
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    msg = info_refused(d)
    assert f"tensor {name} ({role}) is stored as {dtype}" in msg and "floating point" in msg


def test_fp8_norm_is_refused(good, tmp_path):
    d = copy(good["fp8"], tmp_path)
    t = arrays(d)
    name = "model.norm.weight"
    t[name] = t[name].astype(refimpl.layout.DTYPES["F8_E4M3"])
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    assert f"FP8 tensor {name} has no {name}_scale_inv" in info_refused(d)


@pytest.mark.parametrize("value, needle", [(0.0, "zero or negative"), (-0.5, "zero or negative"),
                                           (np.inf, "NaN or Inf"), (np.nan, "NaN or Inf")])
def test_fp8_scales_must_be_finite_and_positive(good, tmp_path, value, needle):
    d = copy(good["fp8"], tmp_path)
    t = arrays(d)
    name = "model.layers.2.self_attn.o_proj.weight_scale_inv"  # read by every forward
    s = t[name].copy()
    s.reshape(-1)[0] = value
    t[name] = s
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    np.save(tmp_path / "t.npy", np.array([[1, 2, 3]]))
    rc, _, msg = run_main("logits", "--checkpoint", d, "--tokens", tmp_path / "t.npy", "--out",
                          tmp_path / "o.npy")
    assert rc == 2 and msg.count("\n") == 1
    assert name in msg and "(layer 2)" in msg and needle in msg and "finite and positive" in msg
    assert not os.path.exists(tmp_path / "o.npy")
    with pytest.raises(refimpl.CheckpointError, match=needle):
        Checkpoint(d).stored_fp8(name.removesuffix("_scale_inv"))


@pytest.mark.parametrize("fname", ["../elsewhere.safetensors", "/etc/passwd", "sub/x.safetensors",
                                   ".hidden.safetensors", "model.bin", 7])
def test_index_naming_a_file_outside_the_checkpoint(good, tmp_path, fname):
    d = copy(good["sharded"], tmp_path)
    index_path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["model.norm.weight"] = fname
    json.dump(index, open(index_path, "w"))
    assert "not a plain .safetensors file name in the checkpoint" in info_refused(d)


def test_a_shard_that_is_a_fifo_is_not_read(good, tmp_path):
    d = copy(good["float"], tmp_path)
    os.unlink(os.path.join(d, "model.safetensors"))
    os.mkfifo(os.path.join(d, "model.safetensors"))  # opening it plainly would block for ever
    assert "model.safetensors: not a regular file" in info_refused(d)


def test_tensor_names_with_control_characters_are_escaped(good, tmp_path):
    d = copy(good["float"], tmp_path)
    t = arrays(d)
    forged = "x\nrefimpl: all 5 cases passed\x1b[1A"
    t["model." + forged] = np.ones(3, dtype=np.int32)
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    msg = info_refused(d)  # exactly one line
    assert "model.x\\nrefimpl: all 5 cases passed\\x1b[1A" in msg and "\x1b" not in msg


def test_integer_tensors_outside_the_models_names_are_not_read_and_allowed(good, tmp_path):
    # a golden case directory keeps int64 inputs beside its model.safetensors
    d = copy(good["float"], tmp_path)
    write_safetensors(os.path.join(d, "inputs.safetensors"), {"input_ids": np.arange(6).reshape(2, 3)})
    rc, out, err = run_main("info", "--checkpoint", d)
    assert rc == 0, err
