"""Fuzzing the two files a user downloads: a valid tiny checkpoint's safetensors header and its
config.json, mutated by hypothesis.  Every mutated input either loads and means what the file
says (the checkpoint: equal to the valid one; the config: every field as written, with its JSON
type), or is refused with one line (a RefimplError; through the command line: exit 2, one line on
stderr, no traceback), within a time bound, writing nothing outside the directories named.

Out of scope by construction: a mutation that gives another *valid* file (BF16 bytes declared as
F16, both 2-byte floats) cannot be told from a real one by any reader, so none is generated."""

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time

import numpy as np
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

import refimpl
from refimpl import Config, ConfigError
from refimpl.config import RopeScaling
from refimpl.checkpoint import Checkpoint
from refimpl.layout import storage_plan
from refimpl.writer import make_checkpoint
from tests.helpers import run_main

TINY = Config.preset("tiny")
TOKENS = np.array([[1, 2, 3, 5]])
TIME_BOUND = 10.0  # seconds per input, every command (a tiny model runs in well under one)


def listing(root):
    return {os.path.relpath(os.path.join(d, n), root)
            for d, dirs, files in os.walk(root) for n in dirs + files}


def contents(ckpt_dir):
    """Everything a checkpoint says, read and checked as `load` and `logits` do -> {name:
    (dtype, shape, sha256 of the bytes)}; every body is read, so NaN and scale checks run too."""
    ck = Checkpoint(ckpt_dir)
    ck.check_against_config()
    ck.check_scales()
    out = {}
    for n in ck.names():
        raw = np.ascontiguousarray(ck.raw(n))
        out[n] = (ck.dtype(n), ck.shape(n), hashlib.sha256(raw.view(np.uint8)).hexdigest())
        if not n.endswith("_scale_inv"):
            ck.weight(n)
    return out


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(checkpoint dir, its contents, its logits for TOKENS) of a tiny FP8 checkpoint."""
    d = str(tmp_path_factory.mktemp("fuzz") / "ckpt")
    make_checkpoint(d, TINY, seed=0, fp8=True)
    return d, contents(d), refimpl.load(d).forward(TOKENS)


def one_line_error(rc, err):
    assert rc == 2, (rc, err)
    assert err.startswith("refimpl: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def run_timed(*argv):
    t = time.perf_counter()
    r = run_main(*argv)
    assert time.perf_counter() - t < TIME_BOUND, argv
    return r


# ---- safetensors headers ----------------------------------------------------------------------

DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "I16", "I8", "U8", "BOOL", "F12",
          "f32", ["F32"], 7, None, ""]
ODD = st.sampled_from([-1, 0, 1, 2**31, 2**63, 2**64 + 1, 1.5, -0.0, True, False, None, "F32", "",
                       "\n", [], {}, [1], [0, 1, 2], {"a": 1}])


def header_mutations(names):
    name = st.sampled_from(names)
    return st.one_of(
        st.tuples(st.just("dtype"), name, st.sampled_from(DTYPES)),
        st.tuples(st.just("shape"), name, st.one_of(st.lists(st.integers(-2, 300), max_size=3), ODD)),
        st.tuples(st.just("shape_reversed"), name),
        st.tuples(st.just("offset"), name, st.integers(0, 1), st.integers(-9, 9)),
        st.tuples(st.just("offsets"), name, ODD),
        st.tuples(st.just("drop"), name),
        st.tuples(st.just("rename"), name, st.text(max_size=6)),
        st.tuples(st.just("duplicate"), name),
        st.tuples(st.just("entry_key"), name, st.sampled_from(["add", "remove"])),
        st.tuples(st.just("metadata"), st.one_of(ODD, st.just({"format": "np"}))),
        st.tuples(st.just("nan"), name),
        st.tuples(st.just("length"), st.integers(-9, 9)),
        st.tuples(st.just("data"), st.integers(-9, 9)),
        st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0x00, 0x7f)),
    )


def serialize(pairs):
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


def mutate(path, mutations):
    """Apply header mutations to the safetensors file at `path` in place."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        pairs = list(json.loads(f.read(n)).items())
        data = f.read()
    raw_ops = []
    for m in mutations:
        kind = m[0]
        idx = {k: i for i, (k, _) in enumerate(pairs)}
        if kind in ("length", "data", "byte", "nan"):
            raw_ops.append(m)
            continue
        if kind == "metadata":
            pairs = [(k, m[1] if k == "__metadata__" else v) for k, v in pairs]
            continue
        if m[1] not in idx:  # renamed or dropped by an earlier mutation
            continue
        i = idx[m[1]]
        entry = dict(pairs[i][1])
        if kind == "dtype":
            if {str(entry["dtype"]), str(m[2])} == {"F16", "BF16"}:
                continue  # a different valid file (see the module docstring)
            entry["dtype"] = m[2]
        elif kind == "shape":
            entry["shape"] = m[2]
        elif kind == "shape_reversed" and isinstance(entry.get("shape"), list):
            entry["shape"] = entry["shape"][::-1]
        elif kind == "offset" and isinstance(entry.get("data_offsets"), list):
            offs = list(entry["data_offsets"])
            if len(offs) == 2 and all(type(x) is int for x in offs):
                offs[m[2]] += m[3]
            entry["data_offsets"] = offs
        elif kind == "offsets":
            entry["data_offsets"] = m[2]
        elif kind == "drop":
            del pairs[i]
            continue
        elif kind == "rename":
            pairs[i] = (m[2], entry)
            continue
        elif kind == "duplicate":
            pairs.insert(i, (m[1], entry))
            continue
        elif kind == "entry_key":
            if m[2] == "add":
                entry["extra"] = 1
            else:
                entry.pop("shape", None)
        pairs[i] = (pairs[i][0], entry)
    text = serialize(pairs)
    length_delta, data_delta = 0, 0
    for m in raw_ops:
        if m[0] == "nan":
            text = text.replace(f'{json.dumps(m[1])}:{{"dtype"', f'{json.dumps(m[1])}:{{"nan":NaN,"dtype"', 1)
        elif m[0] == "length":
            length_delta += m[1]
        elif m[0] == "data":
            data_delta += m[1]
    raw = bytearray(text.encode("utf-8"))
    raw += b" " * (-len(raw) % 8)
    for m in raw_ops:
        if m[0] == "byte":
            raw[m[1] % len(raw)] = m[2]
    data = data[:len(data) + data_delta] if data_delta < 0 else data + bytes(data_delta)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", max(len(raw) + length_delta, 0)) + bytes(raw) + data)


NAMES = sorted(storage_plan(TINY, fp8=True))  # the tensors of the valid checkpoint


@given(mutations=st.lists(header_mutations(NAMES), min_size=1, max_size=3))
@example(mutations=[("metadata", {"format": "np"})])  # loads: metadata is not the tensors
@example(mutations=[("dtype", "model.norm.weight", "F16")])  # BF16 <-> F16: not generated
@example(mutations=[("length", -3)])
@example(mutations=[("dtype", "model.layers.0.mlp.up_proj.weight", "U8")])
@example(mutations=[("duplicate", "model.norm.weight")])
def test_mutated_safetensors_headers_load_equal_or_are_refused_in_one_line(valid, mutations):
    src, want, want_logits = valid
    with tempfile.TemporaryDirectory() as root:
        d = os.path.join(root, "ckpt")
        shutil.copytree(src, d)
        mutate(os.path.join(d, "model.safetensors"), mutations)
        np.save(os.path.join(root, "t.npy"), TOKENS)
        before = listing(root)
        t = time.perf_counter()
        try:
            got = contents(d)
        except refimpl.RefimplError as e:
            msg = str(e)
            assert "\n" not in msg and d in msg, msg  # one line, naming the file
            got = None
        assert time.perf_counter() - t < TIME_BOUND
        event("loaded" if got is not None else "refused")
        if got is not None:
            assert got == want, mutations  # loaded: it is the valid checkpoint
        out = os.path.join(root, "l.npy")
        rc, _, err = run_timed("logits", "--checkpoint", d, "--tokens", os.path.join(root, "t.npy"),
                               "--out", out)
        if got is None:
            one_line_error(rc, err)
            assert listing(root) == before  # nothing written, no temporary left
        else:
            assert rc == 0, err
            np.testing.assert_array_equal(np.load(out), want_logits)
            assert listing(root) == before | {"l.npy"}
        rc, _, err = run_timed("info", "--checkpoint", d)
        assert rc == (2 if got is None else 0)  # info reads headers only: same verdict here,
        if rc == 2:                              # since no mutation touches tensor bodies
            one_line_error(rc, err)


# ---- config.json ------------------------------------------------------------------------------

VALID_CONFIG = TINY.to_dict()
KEYS = sorted(VALID_CONFIG) + [f"rope_scaling.{k}" for k in sorted(VALID_CONFIG["rope_scaling"])]
RAW_VALUES = ["NaN", "Infinity", "-Infinity", '"true"', '"false"', '"no"', "true", "false", "null",
              "64.9", "64.0", "0", "-1", "1", "2", "3", "7", "1024", "1e300", "1e-300", "0.5", "1e6",
              "1000000000", str(2**63), "[]", "{}", "[1, 2]", '"sigmoid"', '"yarn"', '"default"',
              '"\\u001b[2J"', '"greedy"', '"deepseek_v2"']


def config_text(key, raw, how):
    """The valid config with `key` set to the JSON text `raw` (how="set"), deleted, or given
    twice (the second wins in Python's json)."""
    d = json.loads(json.dumps(VALID_CONFIG))
    top, _, sub = key.partition(".")
    holder = d[top] if sub else d
    leaf = sub or top
    if how == "delete":
        del holder[leaf]
        return json.dumps(d)
    holder[leaf] = "__MUT__"
    text = json.dumps(d)
    if how == "twice":
        return text.replace('"__MUT__"', json.dumps(VALID_CONFIG[top][sub] if sub else
                                                   VALID_CONFIG[top]) + f', "{leaf}": {raw}')
    return text.replace('"__MUT__"', raw)


def as_read(cfg, key):
    """The value of config key `key` as the Config holds it, in its config.json form."""
    top, _, sub = key.partition(".")
    d = cfg.to_dict()
    return (d[top] or {}).get(sub) if sub else d[top]


def same_json(a, b):
    """Equal as JSON values, types included (True is not 1, 64.0 is not 64)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@given(key=st.sampled_from(KEYS), raw=st.sampled_from(RAW_VALUES),
       how=st.sampled_from(["set", "set", "set", "delete", "twice"]))
def test_mutated_config_json_reads_as_written_or_is_refused_naming_the_field(key, raw, how):
    with tempfile.TemporaryDirectory() as root:
        p = os.path.join(root, "config.json")
        with open(p, "w") as f:
            f.write(config_text(key, raw, how))
        leaf = key.rpartition(".")[2]
        try:
            cfg = Config.from_json(p)
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and p in msg, msg
            if how != "delete" and key not in ("rope_scaling.type",):
                assert leaf in msg or "duplicate key" in msg, (key, raw, msg)
            cfg = None
        event("loaded" if cfg is not None else "refused")
        if cfg is not None and how == "set" and key not in ("rope_scaling", "rope_scaling.type"):
            value = json.loads(raw)
            if value is None and key.startswith("rope_scaling."):  # null: the YaRN default
                value = RopeScaling.__dataclass_fields__[key.partition(".")[2]].default
            assert same_json(as_read(cfg, key), value), (key, raw, as_read(cfg, key))
            for other in KEYS:  # and nothing else changed
                if other == key or key.startswith(other + ".") or other.startswith(key + "."):
                    continue
                assert same_json(as_read(cfg, other), as_read(TINY, other)), other
        before = listing(root)
        for argv in (["info", "--config", p], ["make-checkpoint", "--config", p, "--dry-run"]):
            rc, out, err = run_timed(*argv)
            if cfg is None:
                one_line_error(rc, err)
            else:
                assert rc == 0, err
        assert listing(root) == before


# ---- model.safetensors.index.json -------------------------------------------------------------

SHARDS = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
INDEX_FILES = st.one_of(st.sampled_from(SHARDS), st.sampled_from(
    ["../" + SHARDS[0], "/etc/passwd", "", ".", "..", SHARDS[0] + " ", "sub/" + SHARDS[0],
     "model.safetensors", "config.json", 7, None, [SHARDS[0]]]))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fuzz-index") / "ckpt")
    make_checkpoint(d, TINY, seed=0, fp8=True, shards=3)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return d, contents(d), json.load(f)


@given(how=st.sampled_from(["map", "map", "drop", "add", "twice", "not an object"]),
       name=st.sampled_from(NAMES), target=INDEX_FILES)
@example(how="map", name="model.embed_tokens.weight", target=SHARDS[0])  # where it is: loads
def test_mutated_index_files_load_equal_or_are_refused_in_one_line(sharded, how, name, target):
    src, want, index = sharded
    text = json.dumps(index)
    wm = dict(index["weight_map"])
    if how == "map":
        wm[name] = target
    elif how == "drop":
        del wm[name]
    elif how == "add":
        wm["model.layers.0.self_attn.ghost.weight"] = target
    if how == "twice":
        entry = f'"{name}": "{index["weight_map"][name]}"'
        text = text.replace(entry, f'{entry}, "{name}": {json.dumps(target)}')
    elif how == "not an object":
        text = json.dumps(dict(index, weight_map=list(wm.items())))
    else:
        text = json.dumps(dict(index, weight_map=wm))
    with tempfile.TemporaryDirectory() as root:
        d = os.path.join(root, "ckpt")
        shutil.copytree(src, d)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            f.write(text)
        before = listing(root)
        try:
            got = contents(d)
        except refimpl.RefimplError as e:
            assert "\n" not in str(e) and d in str(e), str(e)
            got = None
        event("loaded" if got is not None else "refused")
        if got is not None:
            assert got == want
        rc, _, err = run_timed("info", "--checkpoint", d)
        if got is None:
            one_line_error(rc, err)
        else:
            assert rc == 0, err
        assert listing(root) == before
