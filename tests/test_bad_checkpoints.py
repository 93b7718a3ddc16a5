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
from refimpl.checkpoint import Checkpoint, SafetensorsFile, make_checkpoint, write_safetensors
from tests.helpers import run_cli

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
    return refused("info", "--checkpoint", path)


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
