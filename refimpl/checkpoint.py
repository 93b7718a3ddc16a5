"""Checkpoints in the Hugging Face layout: safetensors read (memory-mapped, sharded) and written,
the tensor plan (every name and shape a config implies), and synthetic well-scaled models.

All checkpoint naming lives here (SPEC.md sections 4-7):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.N.{input_layernorm, post_attention_layernorm}.weight
    model.layers.N.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj,
                              kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight
    model.layers.N.mlp.{gate_proj, up_proj, down_proj}.weight               (dense layers)
    model.layers.N.mlp.gate.weight, model.layers.N.mlp.gate.e_score_correction_bias
    model.layers.N.mlp.experts.E.{gate_proj, up_proj, down_proj}.weight
    model.layers.N.mlp.shared_experts.{gate_proj, up_proj, down_proj}.weight
    MTP module k at N = num_hidden_layers + k - 1: the layer above plus
    enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import zlib

import ml_dtypes
import numpy as np

from . import fp8
from .config import Config
from .errors import CheckpointError

# safetensors dtype names -> numpy dtypes (ml_dtypes for bf16 and fp8)
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header

ATTN_NORMS = ("q_a_layernorm", "kv_a_layernorm")
FFN_PROJ = ("gate_proj", "up_proj", "down_proj")
MTP_EXTRA = ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens")


# ---------------------------------------------------------------------------------------------
# The tensor plan: what a config implies
# ---------------------------------------------------------------------------------------------

def attention_shapes(cfg: Config) -> dict[str, tuple]:
    """Short name (under self_attn.) -> shape, for one MLA block."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    s = {}
    if cfg.q_lora_rank is None:
        s["q_proj.weight"] = (h * cfg.qk_head_dim, d)
    else:
        s["q_a_proj.weight"] = (cfg.q_lora_rank, d)
        s["q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        s["q_b_proj.weight"] = (h * cfg.qk_head_dim, cfg.q_lora_rank)
    s["kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
    s["kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    s["kv_b_proj.weight"] = (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    s["o_proj.weight"] = (d, h * cfg.v_head_dim)
    return s


def ffn_shapes(d: int, inter: int) -> dict[str, tuple]:
    return {"gate_proj.weight": (inter, d), "up_proj.weight": (inter, d),
            "down_proj.weight": (d, inter)}


def layer_plan(cfg: Config, layer: int) -> dict[str, tuple]:
    """Every tensor of decoder layer `layer` (MTP layers included) -> shape."""
    d = cfg.hidden_size
    p = f"model.layers.{layer}."
    plan = {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    plan.update({p + "self_attn." + k: v for k, v in attention_shapes(cfg).items()})
    if cfg.is_moe_layer(layer):
        plan[p + "mlp.gate.weight"] = (cfg.n_routed_experts, d)
        if cfg.uses_bias:
            plan[p + "mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            plan.update({f"{p}mlp.experts.{e}.{k}": v
                         for k, v in ffn_shapes(d, cfg.moe_intermediate_size).items()})
        if cfg.n_shared_experts:
            shared = cfg.n_shared_experts * cfg.moe_intermediate_size
            plan.update({p + "mlp.shared_experts." + k: v for k, v in ffn_shapes(d, shared).items()})
    else:
        plan.update({p + "mlp." + k: v for k, v in ffn_shapes(d, cfg.intermediate_size).items()})
    if layer >= cfg.num_hidden_layers:  # an MTP module
        plan[p + "enorm.weight"] = (d,)
        plan[p + "hnorm.weight"] = (d,)
        plan[p + "eh_proj.weight"] = (d, 2 * d)
        plan[p + "shared_head.norm.weight"] = (d,)
        plan[p + "shared_head.head.weight"] = (cfg.vocab_size, d)
        plan[p + "embed_tokens.weight"] = (cfg.vocab_size, d)
    return plan


def tensor_plan(cfg: Config, mtp: bool = True) -> dict[str, tuple]:
    """name -> shape for the whole checkpoint, in dataflow order."""
    plan = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    n = cfg.num_layers_with_mtp if mtp else cfg.num_hidden_layers
    for layer in range(n):
        plan.update(layer_plan(cfg, layer))
    plan["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        plan["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return plan


def layer_of(name: str) -> int | None:
    """The decoder layer index in a tensor name, or None for embedding, final norm and head."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


# ---------------------------------------------------------------------------------------------
# safetensors, read
# ---------------------------------------------------------------------------------------------

class SafetensorsFile:
    """One .safetensors file: the header is parsed and checked up front (no tensor bodies are
    read), tensors are views of a read-only memory map."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.data_start = _read_header(path)
        self._map = None

    def array(self, name: str) -> np.ndarray:
        """The stored tensor, a read-only view of the file (no copy)."""
        dtype, shape, (begin, end) = self.tensors[name]
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                    if os.path.getsize(self.path) else b""
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._map, dtype=DTYPES[dtype], count=count,
                             offset=self.data_start + begin).reshape(shape)


def _read_header(path: str):
    """Parse and check a safetensors header -> ({name: (dtype, shape, (begin, end))}, data_start).

    Every check needed so that reading afterwards cannot go outside the file or misread it:
    header length within the file, JSON object, known dtypes, shapes of non-negative ints,
    offsets inside the data and matching the shape, no two tensors overlapping."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} is larger than the file "
                                      f"({size} bytes): truncated or not safetensors")
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_size = size - 8 - n
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: entry needs dtype, shape and data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                 and x >= 0 for x in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) for x in offs)):
            raise CheckpointError(f"{where}: data_offsets {offs!r} is not two integers")
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{where}: data_offsets {offs} lie outside the {data_size} "
                                  "bytes of data (truncated file or lying header)")
        nbytes = int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but shape "
                                  f"{shape} of {dtype} needs {nbytes}")
        tensors[name] = (dtype, tuple(shape), (begin, end))
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0} and {n1} overlap in the data")
    return tensors, 8 + n


class Checkpoint:
    """A checkpoint directory: config.json plus model.safetensors, or shards listed by
    model.safetensors.index.json, or every *.safetensors in the directory.  Opening reads only
    headers; tensor bodies are mapped and read when asked for."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a checkpoint directory")
        self.path = path
        self.config = Config.from_json(os.path.join(path, "config.json"))
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            self._open_index(index)
        else:
            names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not names:
                raise CheckpointError(f"{path}: no .safetensors files and no index")
            for fname in names:
                st = self._open(fname)
                for t in st.tensors:
                    if t in self.where:
                        raise CheckpointError(f"{path}: tensor {t} is in both {self.where[t]} "
                                              f"and {fname}")
                    self.where[t] = fname

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self.files:
            full = os.path.join(self.path, fname)
            if not os.path.exists(full):
                raise CheckpointError(f"{full}: shard named by the index is missing")
            self.files[fname] = SafetensorsFile(full)
        return self.files[fname]

    def _open_index(self, index: str) -> None:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not an object")
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or os.sep in fname or fname.startswith(".."):
                raise CheckpointError(f"{index}: tensor {name} maps to a bad file name {fname!r}")
            if name not in self._open(fname).tensors:
                raise CheckpointError(f"{index}: tensor {name} is not in {fname}")
            self.where[name] = fname

    # ---- queries that read headers only -----------------------------------------------------
    def names(self) -> list[str]:
        return list(self.where)

    def dtype(self, name: str) -> str:
        return self.files[self.where[name]].tensors[name][0]

    def shape(self, name: str) -> tuple:
        return self.files[self.where[name]].tensors[name][1]

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self.where[name])

    def check_against_config(self) -> None:
        """Every tensor of the main model is present with the shape config.json implies (headers
        only). MTP layers are optional as a whole (transformers' save_pretrained drops them), but
        a checkpoint holding part of an MTP layer is refused."""
        cfg = self.config
        self._check_plan(tensor_plan(cfg, mtp=False))
        for layer in range(cfg.num_hidden_layers, cfg.num_layers_with_mtp):
            plan = layer_plan(cfg, layer)
            if any(n in self.where for n in plan):
                self._check_plan(plan)

    def has_mtp(self) -> bool:
        cfg = self.config
        return cfg.num_nextn_predict_layers > 0 and all(
            n in self.where for n in layer_plan(cfg, cfg.num_hidden_layers))

    def _check_plan(self, plan: dict) -> None:
        for name, shape in plan.items():
            if name not in self.where:
                raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(f"{self.file_of(name)}: tensor {name} has shape "
                                      f"{list(got)}, config.json implies {list(shape)}")

    # ---- reading bodies -----------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The stored array, as stored (a read-only memory-mapped view)."""
        if name not in self.where:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        return self.files[self.where[name]].array(name)

    def weight(self, name: str, dtype=np.float64) -> np.ndarray:
        """The tensor as a float array of `dtype`, FP8 dequantised with its weight_scale_inv,
        checked finite (the error names the tensor and its layer)."""
        stored = self.raw(name)
        if stored.dtype == DTYPES["F8_E4M3"]:
            sname = name + "_scale_inv"
            if sname not in self.where:
                raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name} has no {sname}")
            s = self.raw(sname)
            if s.shape != fp8.scale_shape(stored.shape):
                raise CheckpointError(f"{self.file_of(sname)}: {sname} has shape {list(s.shape)}, "
                                      f"a {list(stored.shape)} weight needs "
                                      f"{list(fp8.scale_shape(stored.shape))}")
            arr = fp8.dequantize(stored, s, dtype=np.float64).astype(dtype, copy=False)
        else:
            arr = np.array(stored, dtype=dtype)  # a private, writable copy in working precision
        if not np.isfinite(arr).all():
            layer = layer_of(name)
            at = "" if layer is None else f" (layer {layer})"
            raise CheckpointError(f"{self.file_of(name)}: tensor {name}{at} contains NaN or Inf")
        return arr


# ---------------------------------------------------------------------------------------------
# safetensors, write
# ---------------------------------------------------------------------------------------------

def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> numpy array) as one safetensors file, atomically: a temporary
    name in the same directory, renamed when complete."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {a.dtype}, not storable")
        header[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# synthetic, well-scaled models
# ---------------------------------------------------------------------------------------------

def random_tensor(name: str, shape: tuple, seed: int) -> np.ndarray:
    """A well-scaled random value for one planned tensor, float64, depending only on (seed, name)
    so any tensor can be made alone and in any order.

    Linear maps N(0, 1/in) keep activations O(1); RMSNorm weights U(0.5, 1.5) and the gate bias
    N(0, 0.05^2) are far from constant, so that a port that drops them fails; embeddings N(0, 1)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    base = name.rsplit(".", 1)[0]
    if name.endswith("e_score_correction_bias"):
        return rng.normal(0.0, 0.05, shape)
    if len(shape) == 1:  # every 1-d weight of these models is an RMSNorm weight
        return rng.uniform(0.5, 1.5, shape)
    if base.endswith("embed_tokens"):
        return rng.normal(0.0, 1.0, shape)
    return rng.normal(0.0, shape[1] ** -0.5, shape)


def random_weights(cfg: Config, seed: int = 0, mtp: bool = True) -> dict[str, np.ndarray]:
    """Every planned tensor, float64, well-scaled (see random_tensor)."""
    return {n: random_tensor(n, s, seed) for n, s in tensor_plan(cfg, mtp=mtp).items()}


STORE_DTYPES = {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def save_checkpoint(out: str | os.PathLike, cfg: Config, weights: dict[str, np.ndarray],
                    store_dtype: str = "float32") -> None:
    """config.json + model.safetensors into `out` (which must not exist or be empty). Written
    to a temporary sibling directory and renamed, so a failure leaves nothing half written.
    The gate bias is kept float32 or better, as the published checkpoint does."""
    out = os.fspath(out)
    if store_dtype not in STORE_DTYPES:
        raise CheckpointError(f"store dtype {store_dtype!r} is not one of {', '.join(STORE_DTYPES)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out}: already exists and is not an empty directory")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".refimpl-", dir=parent)
    try:
        dt = np.dtype(STORE_DTYPES[store_dtype])
        stored = {}
        for name, a in weights.items():
            keep = name.endswith("e_score_correction_bias") and dt.itemsize < 4
            stored[name] = np.asarray(a).astype(np.float32 if keep else dt)
        extra = dict(cfg.extra, torch_dtype=store_dtype)
        cfg.replace(extra=extra).to_json(os.path.join(tmp, "config.json"))
        write_safetensors(os.path.join(tmp, "model.safetensors"), stored, {"format": "pt"})
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_checkpoint(out: str | os.PathLike, cfg: Config, seed: int = 0,
                    store_dtype: str = "float32") -> None:
    """A random but well-scaled model in the HF layout (`refimpl make-checkpoint`)."""
    save_checkpoint(out, cfg, random_weights(cfg, seed), store_dtype)
