"""Checkpoints in the Hugging Face layout: safetensors read (memory-mapped, sharded) and written,
the tensor plan (every name and shape a config implies), and synthetic well-scaled models.

The tensor names themselves are in names.py (SPEC.md sections 4-7); the plan here says which of
them a config implies, with their shapes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import zlib

import ml_dtypes
import numpy as np

from . import fp8, jsonfile, names
from .fp8 import scale_shape
from .atomic import atomic_directory, atomic_file, check_destination, write_text
from .config import Config, brief
from .errors import CheckpointError, printable
from .names import ATTN_NORMS, BIAS_SUFFIX, FFN_PROJ, MTP_EXTRA, layer_of  # noqa: F401 (re-exported)

# safetensors dtype names -> numpy dtypes (ml_dtypes for bf16 and fp8)
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
MAX_DIM = 2 ** 40  # no real dimension comes near; a zero-sized tensor can't hide a huge one


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
    d, i = cfg.hidden_size, layer
    plan = {names.input_norm(i): (d,), names.post_attention_norm(i): (d,)}
    plan.update({names.attention(i) + k: v for k, v in attention_shapes(cfg).items()})
    if cfg.is_moe_layer(layer):
        plan[names.gate_weight(i)] = (cfg.n_routed_experts, d)
        if cfg.uses_bias:
            plan[names.gate_bias(i)] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            plan.update({names.expert(i, e) + k: v
                         for k, v in ffn_shapes(d, cfg.moe_intermediate_size).items()})
        if cfg.n_shared_experts:
            shared = cfg.n_shared_experts * cfg.moe_intermediate_size
            plan.update({names.shared_experts(i) + k: v for k, v in ffn_shapes(d, shared).items()})
    else:
        plan.update({names.mlp(i) + k: v for k, v in ffn_shapes(d, cfg.intermediate_size).items()})
    if layer >= cfg.num_hidden_layers:  # an MTP module
        plan[names.enorm(i)] = (d,)
        plan[names.hnorm(i)] = (d,)
        plan[names.eh_proj(i)] = (d, 2 * d)
        plan[names.shared_head_norm(i)] = (d,)
        plan[names.mtp_head(i)] = (cfg.vocab_size, d)
        plan[names.mtp_embed(i)] = (cfg.vocab_size, d)
    return plan


def mtp_stored(cfg: Config, stored, depths: int | None = None) -> bool:
    """Whether the tensor names `stored` hold MTP modules 1..depths (default: all
    num_nextn_predict_layers) completely, the optional gate bias aside: the one MTP-presence
    check (Checkpoint.has_mtp, WeightStore.has_mtp)."""
    n = cfg.num_nextn_predict_layers if depths is None else depths
    return n >= 1 and all(name in stored for k in range(1, n + 1)
                          for name in layer_plan(cfg, names.mtp_layer(cfg, k))
                          if not name.endswith(BIAS_SUFFIX))


def tensor_plan(cfg: Config, mtp: bool = True) -> dict[str, tuple]:
    """name -> shape for the whole checkpoint, in dataflow order."""
    plan = {names.EMBED: (cfg.vocab_size, cfg.hidden_size)}
    n = cfg.num_layers_with_mtp if mtp else cfg.num_hidden_layers
    for layer in range(n):
        plan.update(layer_plan(cfg, layer))
    plan[names.FINAL_NORM] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        plan[names.LM_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    return plan


# Linear weights stored as FP8 e4m3 with a float32 `<name>_scale_inv` in the published
# checkpoint (SPEC.md section 7): every projection of attention and of the FFNs (dense, shared,
# routed), in the MTP layer's decoder block too.  eh_proj, the gate, norms, embedding and head
# are not.
FP8_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")
STORAGE_BYTES = {k: v.itemsize for k, v in DTYPES.items()}


def _role(name: str) -> str:
    """What a tensor is, in words, for error messages."""
    if name.endswith("e_score_correction_bias"):
        return "gate bias"
    if name.endswith("mlp.gate.weight"):
        return "router gate"
    parts = name.split(".")
    if len(parts) >= 2 and "norm" in parts[-2]:
        return "norm weight"
    if "embed_tokens" in name:
        return "embedding"
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        return "output head"
    if name.endswith("_proj.weight"):
        return "projection"
    return "weight"


def is_fp8_weight(name: str) -> bool:
    """True for the linear weights the published checkpoint stores as FP8 e4m3 (SPEC.md 7)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in FP8_PROJECTIONS \
        and layer_of(name) is not None


def storage_plan(cfg: Config, fp8: bool = True, mtp: bool = True,
                 store_dtype: str = "bfloat16") -> dict[str, tuple[str, tuple]]:
    """name -> (safetensors dtype, shape) of every tensor make-checkpoint writes, scales included.

    fp8=True is the published layout (README_WEIGHTS; SPEC.md sections 6-7): FP8 projections,
    each followed by an F32 `<name>_scale_inv` of shape (ceil(out/128), ceil(in/128)); the rest
    BF16, except the gate bias, kept F32.  The MTP layer's stored embedding and head copies are
    BF16 like the main ones.  For deepseek-v3 this gives the published 91,991 tensors and
    688,574,839,360 bytes."""
    return {n: (d, s) for n, d, s in stored_entries(tensor_plan(cfg, mtp=mtp), fp8, store_dtype)}


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

    def drop_pages(self, name: str) -> None:
        """Tell the kernel this process is done with a tensor's pages (MADV_DONTNEED): they leave
        its resident set (the page cache keeps them) and are read again if touched again."""
        if not isinstance(self._map, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, (begin, end) = self.tensors[name]
        page = mmap.PAGESIZE
        lo = (self.data_start + begin) // page * page
        hi = min(-(-(self.data_start + end) // page) * page, len(self._map))
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what norms, scales, the gate and its bias may be
MODEL_PREFIXES = ("model.", "lm_head.")  # every tensor name the model reads (SPEC.md section 6)
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _read_header(path: str):
    """Parse and check a safetensors header -> ({name: (dtype, shape, (begin, end))}, data_start).

    At least as strict as the safetensors library, so that reading afterwards cannot go outside
    the file or misread it: a regular file; header length within the file and the format's
    limit; the header exactly one JSON object (no duplicate keys, no NaN); `__metadata__` an
    object of strings; each entry exactly dtype (a known name), shape (non-negative integers)
    and data_offsets (two integers) whose span is prod(shape) x the dtype's size; the entries
    together cover the data region exactly: no overlap, no hole, no trailing bytes."""
    shown = printable(path)
    fd, st = jsonfile.open_regular(path, CheckpointError)
    size = st.st_size
    try:
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{shown}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{shown}: header length {n} is larger than the file "
                                      f"({size} bytes): truncated or not safetensors")
            if n > MAX_HEADER:
                raise CheckpointError(f"{shown}: header length {n} exceeds the {MAX_HEADER}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{shown}: cannot read ({e.strerror})") from None
    if len(raw) != n:
        raise CheckpointError(f"{shown}: the file shrank while being read")
    return parse_header(raw, size, shown)


def parse_header(raw: bytes, size: int, shown: str):
    """A safetensors header's JSON bytes, of a file of `size` bytes named `shown` -> ({name:
    (dtype, shape, (begin, end))}, data_start), checked as `_read_header` says (for a reader that
    opened the file itself, e.g. a candidate's outputs read through one descriptor)."""
    n = len(raw)
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{shown}: header does not start with '{{' (not safetensors, or a "
                              "header length that does not match the header)")
    header = jsonfile.loads(raw, f"{shown}: header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown}: header is not a JSON object")
    data_size = size - 8 - n
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{shown}: __metadata__ must be an object of strings")
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{shown}: tensor {printable(name)}"
        if not isinstance(info, dict) or info.keys() != _ENTRY_KEYS:
            got = sorted(info) if isinstance(info, dict) else type(info).__name__
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and "
                                  f"data_offsets, got {brief(got)}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {brief(dtype)}")
        if not (type(shape) is list and len(shape) <= 8
                and all(type(x) is int and 0 <= x <= MAX_DIM for x in shape)):
            raise CheckpointError(f"{where}: shape {brief(shape)} is not a list of at most 8 "
                                  f"integers from 0 to {MAX_DIM}")
        if not (type(offs) is list and len(offs) == 2):
            raise CheckpointError(f"{where}: data_offsets {brief(offs)} is not two integers")
        begin, end = offs
        if type(begin) is not int or type(end) is not int:
            raise CheckpointError(f"{where}: data_offsets {brief(offs)} is not two integers")
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{where}: data_offsets {offs} lie outside the {data_size} "
                                  "bytes of data (truncated file or lying header)")
        nbytes = math.prod(shape) * STORAGE_BYTES[dtype]
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but shape "
                                  f"{shape} of {dtype} needs {nbytes}")
        tensors[name] = (dtype, tuple(shape), (begin, end))
        spans.append((begin, end, name))
    spans.sort()
    covered = 0  # the data region is covered exactly, in order (as the safetensors library checks)
    for k, (begin, end, name) in enumerate(spans):
        if begin < covered:
            other = next(o for b, e, o in spans[:k] if e > begin)
            raise CheckpointError(f"{shown}: tensors {printable(other)} and {printable(name)} "
                                  "overlap in the data")
        if begin > covered:
            raise CheckpointError(f"{shown}: bytes {covered} to {begin} of the data belong to no "
                                  f"tensor (a hole before {printable(name)}): not a valid "
                                  "safetensors file")
        covered = end
    if covered != data_size:
        raise CheckpointError(f"{shown}: {data_size - covered} trailing bytes after the last "
                              f"tensor (the data region is {data_size} bytes, the tensors cover "
                              f"{covered}): not a valid safetensors file")
    return tensors, 8 + n


class Checkpoint:
    """A checkpoint directory: config.json plus model.safetensors, or shards listed by
    model.safetensors.index.json, or every *.safetensors in the directory.  Opening reads only
    headers; tensor bodies are mapped and read when asked for."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{printable(path)}: not a checkpoint directory")
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
                raise CheckpointError(f"{printable(path)}: no .safetensors files and no index")
            for fname in names:
                st = self._open(fname)
                for t in st.tensors:
                    if t in self.where:
                        raise CheckpointError(f"{printable(path)}: tensor {printable(t)} is in "
                                              f"both {printable(self.where[t])} and {printable(fname)}")
                    self.where[t] = fname
        self.fp8_tensors = self.check_dtypes()

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self.files:
            full = os.path.join(self.path, fname)
            if not os.path.exists(full):
                raise CheckpointError(f"{printable(full)}: shard named by the index is missing")
            self.files[fname] = SafetensorsFile(full)
        return self.files[fname]

    def _open_index(self, index: str) -> None:
        shown = printable(index)
        doc = jsonfile.load(index, CheckpointError)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{shown}: not a valid index (needs an object weight_map)")
        plain = set()  # file names already checked (163 for V3's 91,991 tensors)
        for name, fname in weight_map.items():
            if fname not in plain if isinstance(fname, str) else True:
                if not (isinstance(fname, str) and fname.endswith(".safetensors")
                        and fname == os.path.basename(fname) and not fname.startswith(".")
                        and "\\" not in fname):
                    raise CheckpointError(f"{shown}: tensor {printable(name)} maps to "
                                          f"{brief(fname)}, not a plain .safetensors file name "
                                          "in the checkpoint")
                plain.add(fname)
            if name not in self._open(fname).tensors:
                raise CheckpointError(f"{shown}: tensor {printable(name)} is not in "
                                      f"{printable(fname)}")
            self.where[name] = fname

    # ---- queries that read headers only -----------------------------------------------------
    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def dtype(self, name: str) -> str:
        return self.files[self.where[name]].tensors[name][0]

    def shape(self, name: str) -> tuple:
        return self.files[self.where[name]].tensors[name][1]

    def stored_nbytes(self, name: str) -> int:
        """Bytes read to materialise `name`: the tensor as stored, plus its scale if FP8."""
        n = math.prod(self.shape(name)) * STORAGE_BYTES[self.dtype(name)]
        sname = name + "_scale_inv"
        if self.dtype(name) == "F8_E4M3" and sname in self.where:
            n += math.prod(self.shape(sname)) * STORAGE_BYTES[self.dtype(sname)]
        return n

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self.where[name])

    def check_against_config(self) -> None:
        """Every tensor of the main model is present with the shape config.json implies (headers
        only). MTP layers are optional as a whole (transformers' save_pretrained drops them), but
        a checkpoint holding part of an MTP layer is refused.  The gate bias's existence comes from
        the checkpoint (SPEC.md section 9): without any e_score_correction_bias, selection uses
        the scores alone; with some, every MoE layer must have one."""
        cfg = self.config
        biasless = not any(n.endswith(BIAS_SUFFIX) for n in self.where)

        def planned(plan):
            return {n: s for n, s in plan.items() if not (biasless and n.endswith(BIAS_SUFFIX))}

        self._check_plan(planned(tensor_plan(cfg, mtp=False)))
        for layer in range(cfg.num_hidden_layers, cfg.num_layers_with_mtp):
            plan = planned(layer_plan(cfg, layer))
            if any(n in self.where for n in plan):
                self._check_plan(plan)

    def has_mtp(self) -> bool:
        """All num_nextn_predict_layers MTP modules are stored."""
        return mtp_stored(self.config, self.where)

    def check_scales(self) -> int:
        """Every FP8 tensor has a float `<name>_scale_inv` whose shape fits it (headers only)
        -> the number of FP8 tensors.  (Checked when the checkpoint is opened: check_dtypes.)"""
        return self.fp8_tensors

    def check_dtypes(self) -> int:
        """Every stored dtype fits the tensor's role (headers only; SPEC.md section 7): weights,
        norms, the gate and its bias floating point (F64, F32, F16, BF16); FP8 only as F8_E4M3,
        on a 2-d weight with a float `<name>_scale_inv` of the block shape; a `_scale_inv` only
        beside an F8_E4M3 weight (FP8 bytes declared as I8, U8 or BOOL would drop their scale).
        Tensors outside the model's names (`model.`, `lm_head.`) are never read and not checked
        (a golden case directory holds int64 inputs beside its model).
        -> the number of FP8 tensors."""
        fp8_count = 0
        for name in self.where:
            dtype = self.dtype(name)
            if dtype == "F8_E4M3":
                self._scale_name(name)
                fp8_count += 1
            elif name.endswith("_scale_inv"):
                base = name[:-len("_scale_inv")]
                if dtype not in FLOAT_DTYPES:
                    raise CheckpointError(f"{printable(self.file_of(name))}: {printable(name)} "
                                          f"(an FP8 scale) is stored as {dtype}, expected a float "
                                          "dtype (F32 as published)")
                if base not in self.where or self.dtype(base) != "F8_E4M3":
                    got = "is missing" if base not in self.where else f"is {self.dtype(base)}"
                    raise CheckpointError(f"{printable(self.file_of(name))}: {printable(name)} is "
                                          f"a block scale but {printable(base)} {got}; FP8 "
                                          "weights must be stored as F8_E4M3")
            elif dtype not in FLOAT_DTYPES and name + "_scale_inv" in self.where:
                raise CheckpointError(f"{printable(self.file_of(name))}: {printable(name)} has a "
                                      f"block scale but is stored as {dtype}; FP8 weights must "
                                      "be stored as F8_E4M3")
            elif dtype not in FLOAT_DTYPES and name.startswith(MODEL_PREFIXES):
                role = _role(name)
                raise CheckpointError(f"{printable(self.file_of(name))}: tensor {printable(name)} "
                                      f"({role}) is stored as {dtype}; a {role} must be floating "
                                      "point (F32, BF16, F16 or F64, or F8_E4M3 with a "
                                      "weight_scale_inv for a 2-d weight)")
        return fp8_count

    def _scale_name(self, name: str) -> str:
        """The checked name of an FP8 tensor's scale (SPEC.md section 7)."""
        sname = name + "_scale_inv"
        if sname not in self.where:
            raise CheckpointError(f"{printable(self.file_of(name))}: FP8 tensor {printable(name)} "
                                  f"has no {printable(sname)}")
        shape, want = self.shape(sname), scale_shape(self.shape(name)) if len(self.shape(name)) == 2 else None
        if want is None:
            raise CheckpointError(f"{printable(self.file_of(name))}: FP8 tensor {printable(name)} "
                                  f"has shape {list(self.shape(name))}; only 2-d weights can be "
                                  "block-scaled")
        if shape != want:
            raise CheckpointError(f"{printable(self.file_of(sname))}: {printable(sname)} has shape "
                                  f"{list(shape)}, a {list(self.shape(name))} weight needs {list(want)}")
        if self.dtype(sname) not in FLOAT_DTYPES:
            raise CheckpointError(f"{printable(self.file_of(sname))}: {printable(sname)} has dtype "
                                  f"{self.dtype(sname)}, expected a float dtype (F32 as published)")
        return sname

    def inventory(self) -> dict:
        """Count the stored tensors and check them against config.json (headers only):
        what `refimpl info --checkpoint` reports."""
        self.check_against_config()
        fp8_weights = self.check_scales()
        by_dtype: dict[str, int] = {}
        nbytes = params = 0
        for name in self.where:
            dtype, shape = self.dtype(name), self.shape(name)
            size = math.prod(shape)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size * STORAGE_BYTES[dtype]
            nbytes += size * STORAGE_BYTES[dtype]
            if not name.endswith("_scale_inv"):
                params += size
        return {"path": self.path, "files": len(self.files), "tensors": len(self.where),
                "bytes": nbytes, "params": params, "by_dtype": dict(sorted(by_dtype.items())),
                "has_mtp": self.has_mtp(), "fp8_weights": fp8_weights}

    def _check_plan(self, plan: dict) -> None:
        for name, shape in plan.items():
            if name not in self.where:
                raise CheckpointError(f"{printable(self.path)}: tensor {name} is missing from the "
                                      "checkpoint")
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(f"{printable(self.file_of(name))}: tensor {name} has shape "
                                      f"{list(got)}, config.json implies {list(shape)}")

    # ---- reading bodies -----------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The stored array, as stored (a read-only memory-mapped view)."""
        if name not in self.where:
            raise CheckpointError(f"{printable(self.path)}: tensor {printable(name)} is missing "
                                  "from the checkpoint")
        return self.files[self.where[name]].array(name)

    def weight(self, name: str, dtype=np.float64) -> np.ndarray:
        """The tensor as a float array of `dtype`, FP8 dequantised with its weight_scale_inv,
        checked finite (the error names the tensor and its layer)."""
        stored = self.raw(name)
        if stored.dtype == DTYPES["F8_E4M3"]:
            sname = self._scale_name(name)
            s = self.raw(sname)
            self._check_scale(sname, s)
            arr = fp8.dequantize(stored, s, dtype=dtype)
        else:
            arr = np.array(stored, dtype=dtype)  # a private, writable copy in working precision
        self._drop(name)
        self._check_finite(name, arr)
        return arr

    def stored_fp8(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """An FP8 tensor as stored, copied out of the map: (q e4m3 [out, in], scale_inv f32)."""
        sname = self._scale_name(name)
        q, s = np.array(self.raw(name)), np.array(self.raw(sname), dtype=np.float32)
        self._drop(name)
        self._drop(sname)
        self._check_scale(sname, s)
        self._check_finite(name, q)
        return q, s

    def rows(self, name: str, ids, dtype=np.float64) -> np.ndarray:
        """Rows `ids` (int array, any shape) of a 2-d tensor, reading only those rows
        (an embedding lookup).   -> [*ids.shape, cols]"""
        stored = self.raw(name)
        if stored.dtype == DTYPES["F8_E4M3"]:
            return self.weight(name, dtype)[ids]
        out = np.asarray(stored[ids], dtype=dtype)
        self._check_finite(name, out)
        return out

    def _drop(self, name: str) -> None:
        self.files[self.where[name]].drop_pages(name)

    def _check_scale(self, name: str, s: np.ndarray) -> None:
        """An FP8 block scale must be finite and strictly positive (a zero or negative scale
        silently zeroes or flips a block): checked when read, cheap (one value per 128x128)."""
        bad = fp8.bad_scales(s)
        if bad:
            layer = layer_of(name)
            at = "" if layer is None else f" (layer {layer})"
            raise CheckpointError(f"{printable(self.file_of(name))}: {printable(name)}{at} holds "
                                  f"{bad}; FP8 block scales must be finite and positive")

    def _check_finite(self, name: str, arr: np.ndarray, chunk: int = 1 << 22) -> None:
        """NaN or Inf anywhere -> an error naming the tensor and its layer (checked in chunks,
        so no full-size temporary)."""
        flat = arr.reshape(-1)
        if flat.dtype == DTYPES["F8_E4M3"]:  # e4m3fn has no Inf; NaN is the code 0x7f/0xff
            u = flat.view(np.uint8)
            bad = any(((u[i:i + chunk] & 0x7F) == 0x7F).any() for i in range(0, u.size, chunk))
        else:
            bad = not all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))
        if bad:
            layer = layer_of(name)
            at = "" if layer is None else f" (layer {layer})"
            raise CheckpointError(f"{printable(self.file_of(name))}: tensor {printable(name)}{at} "
                                  "contains NaN or Inf")


# ---------------------------------------------------------------------------------------------
# safetensors, write
# ---------------------------------------------------------------------------------------------

def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> numpy array) as one safetensors file, atomically: a temporary
    name in the same directory, renamed when complete."""
    arrays = {}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {a.dtype}, not storable")
        arrays[name] = a
    entries = [(n, DTYPE_NAMES[a.dtype], a.shape) for n, a in arrays.items()]
    write_safetensors_planned(path, entries, arrays.__getitem__, metadata)


def write_safetensors_planned(path: str, entries, produce, metadata: dict | None = None) -> None:
    """Write one safetensors file whose header comes from a plan, `entries` = [(name, dtype
    name, shape)], asking `produce(name)` for each array only when its turn comes (so a shard
    never needs more memory than its largest tensor).  Atomic: temporary name, then rename."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * STORAGE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with atomic_file(path, CheckpointError) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            a = np.ascontiguousarray(produce(name))
            assert a.dtype == DTYPES[dtype] and a.shape == tuple(shape), (name, a.dtype, a.shape)
            f.write(memoryview(a.reshape(-1).view(np.uint8)))


def shard_entries(entries: list, shards: int) -> list[list]:
    """Split planned (name, dtype, shape) entries, in order, into `shards` non-empty runs of
    about equal bytes; a weight and its `_scale_inv` (adjacent in the plan) stay together."""
    groups: list[list] = []  # [entries, bytes]: units that are never split
    for e in entries:
        size = math.prod(e[2]) * STORAGE_BYTES[e[1]]
        if groups and e[0] == groups[-1][0][-1][0] + "_scale_inv":
            groups[-1][0].append(e)
            groups[-1][1] += size
        else:
            groups.append([[e], size])
    if not 1 <= shards <= len(groups):
        raise CheckpointError(f"--shards {shards}: must be between 1 and {len(groups)} (the "
                              "weights of this checkpoint)")
    total = max(sum(size for _, size in groups), 1)
    out: list[list] = [[] for _ in range(shards)]
    target = done = 0
    for g, (members, size) in enumerate(groups):
        wanted = max(min(done * shards // total, shards - 1), shards - (len(groups) - g))
        target = max(target, min(target + 1, wanted))  # one shard at a time: none left empty
        out[target].extend(members)
        done += size
    return out


def shard_name(k: int, shards: int) -> str:
    """The published file names: model-00001-of-00163.safetensors."""
    return f"model-{k + 1:05d}-of-{shards:05d}.safetensors"


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


FLOAT_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16"}
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}


def stored_entries(shapes: dict, fp8: bool, store_dtype: str) -> list[tuple[str, str, tuple]]:
    """[(stored name, safetensors dtype, shape)] for logical tensors name -> shape: FP8
    projections with their scales when fp8 (SPEC.md section 7), the rest in store_dtype, the
    gate bias float32 or better (as published)."""
    if store_dtype not in FLOAT_DTYPE_NAMES:
        raise CheckpointError(f"store dtype {store_dtype!r} is not one of {', '.join(FLOAT_DTYPE_NAMES)}")
    float_dtype = FLOAT_DTYPE_NAMES[store_dtype]
    out = []
    for name, shape in shapes.items():
        if fp8 and is_fp8_weight(name) and len(shape) == 2:
            out.append((name, "F8_E4M3", tuple(shape)))
            out.append((name + "_scale_inv", "F32", scale_shape(shape)))
        elif name.endswith("e_score_correction_bias") and STORAGE_BYTES[float_dtype] < 4:
            out.append((name, "F32", tuple(shape)))
        else:
            out.append((name, float_dtype, tuple(shape)))
    return out


class _Encoder:
    """Turns logical float64 tensors into stored ones on demand: cast, or FP8 quantise (the
    weight first, its scale from the same quantisation next)."""

    def __init__(self, entries, value, ue8m0: bool):
        self.dtypes = {n: d for n, d, _ in entries}
        self.value, self.ue8m0 = value, ue8m0
        self._scales: dict = {}

    def __call__(self, name: str) -> np.ndarray:
        if name in self._scales:
            return self._scales.pop(name)
        dtype = self.dtypes[name]
        a = self.value(name)
        if dtype == "F8_E4M3":
            q, s = fp8.quantize(np.asarray(a, dtype=np.float64), ue8m0=self.ue8m0)
            self._scales[name + "_scale_inv"] = s
            return q
        return np.asarray(a).astype(DTYPES[dtype])


def _config_for(cfg: Config, store_dtype: str, fp8_layout: bool, ue8m0: bool) -> Config:
    """config.json as written: torch_dtype of the stored floats, quantization_config only when
    the weights really are FP8 (a float checkpoint that claims FP8 misleads loaders)."""
    extra = {k: v for k, v in cfg.extra.items() if k != "quantization_config"}
    extra["torch_dtype"] = store_dtype
    if fp8_layout:
        extra["quantization_config"] = dict(FP8_QUANT_CONFIG, **({"scale_fmt": "ue8m0"} if ue8m0 else {}))
    return cfg.replace(extra=extra)


def write_checkpoint(out: str | os.PathLike, cfg: Config, entries: list, produce,
                     shards: int | None = None, store_dtype: str = "float32",
                     fp8_layout: bool = False, ue8m0: bool = False, progress=None) -> None:
    """config.json plus the planned tensors into `out` (must not exist or be empty): one
    model.safetensors, or with `shards` the published layout model-0000k-of-0000N.safetensors
    plus model.safetensors.index.json.  Everything goes to a temporary sibling directory that is
    renamed when complete, so a failure leaves nothing half written."""
    out = os.fspath(out)
    check_destination(out, "directory", CheckpointError)
    parent = os.path.dirname(os.path.abspath(out))
    runs = [entries] if shards is None else shard_entries(entries, shards)
    need = sum(math.prod(sh) * STORAGE_BYTES[d] for _, d, sh in entries)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise CheckpointError(f"{printable(out)}: the checkpoint needs {need:,} bytes but only "
                              f"{free:,} are free there (--dry-run shows the plan without writing)")
    with atomic_directory(out, CheckpointError) as tmp:
        _config_for(cfg, store_dtype, fp8_layout, ue8m0).to_json(os.path.join(tmp, "config.json"))
        weight_map = {}
        for k, run in enumerate(runs):
            fname = "model.safetensors" if shards is None else shard_name(k, shards)
            write_safetensors_planned(os.path.join(tmp, fname), run, produce, {"format": "pt"})
            weight_map.update({n: fname for n, _, _ in run})
            if progress is not None:
                progress(k + 1, len(runs))
        if shards is not None:
            index = {"metadata": {"total_size": need}, "weight_map": weight_map}
            write_text(os.path.join(tmp, "model.safetensors.index.json"),
                       json.dumps(index, indent=2) + "\n", CheckpointError)


def save_checkpoint(out: str | os.PathLike, cfg: Config, weights: dict[str, np.ndarray],
                    store_dtype: str = "float32", fp8: bool = False, shards: int | None = None,
                    ue8m0: bool = False) -> None:
    """Weights in memory (name -> float array) as a checkpoint in the HF layout: floats in
    store_dtype (the gate bias float32 or better, as published), with fp8 the projections as
    e4m3 with 128x128 block scales (SPEC.md section 7); optionally in `shards` files."""
    entries = stored_entries({n: np.shape(a) for n, a in weights.items()}, fp8, store_dtype)
    write_checkpoint(out, cfg, entries, _Encoder(entries, weights.__getitem__, ue8m0), shards,
                     store_dtype, fp8_layout=fp8, ue8m0=ue8m0)


def make_checkpoint(out: str | os.PathLike, cfg: Config, seed: int = 0,
                    store_dtype: str | None = None, fp8: bool = False, shards: int | None = None,
                    ue8m0: bool = False, value=None, progress=None) -> None:
    """A random but well-scaled model in the HF layout (`refimpl make-checkpoint`), written one
    tensor at a time.  With fp8 the published layout: FP8 projections with scales, the rest
    BF16 (unless store_dtype says otherwise), the gate bias F32, MTP layers included.
    `value(name, shape)` replaces random_tensor (benchmarks use a cheaper generator)."""
    store_dtype = store_dtype or ("bfloat16" if fp8 else "float32")
    shapes = tensor_plan(cfg)
    entries = stored_entries(shapes, fp8, store_dtype)
    value = value or (lambda name, shape: random_tensor(name, shape, seed))
    encode = _Encoder(entries, lambda name: value(name, shapes[name]), ue8m0)
    write_checkpoint(out, cfg, entries, encode, shards, store_dtype, fp8_layout=fp8, ue8m0=ue8m0,
                     progress=progress)
