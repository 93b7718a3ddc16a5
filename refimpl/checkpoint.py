"""Reading checkpoints in the Hugging Face layout: safetensors files (headers parsed and checked
up front, tensors memory-mapped) and checkpoint directories (one file, shards with an index, or
every *.safetensors), validated against the config's tensor plan (layout.py) and read by name.
"""

from __future__ import annotations

import math
import mmap
import os
import struct

import numpy as np

from . import fp8, jsonfile
from .config import Config, brief
from .errors import CheckpointError, printable
from .fp8 import scale_shape
from .layout import DTYPES, STORAGE_BYTES, layer_plan, mtp_stored, role_of, tensor_plan
from .names import BIAS_SUFFIX, layer_of

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
MAX_DIM = 2 ** 40  # no real dimension comes near; a zero-sized tensor can't hide a huge one


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
        self._advise(name, "MADV_DONTNEED")

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's pages into the page cache now
        (MADV_WILLNEED): the disk works while this process converts other tensors.  Nothing is
        mapped into the process until it touches the pages (its resident set does not grow)."""
        if self._map is None:
            self.array(name)  # maps the file
        self._advise(name, "MADV_WILLNEED")

    def _advise(self, name: str, advice: str) -> None:
        if not isinstance(self._map, mmap.mmap) or not hasattr(mmap, advice):
            return
        _, _, (begin, end) = self.tensors[name]
        page = mmap.PAGESIZE
        lo = (self.data_start + begin) // page * page
        hi = min(-(-(self.data_start + end) // page) * page, len(self._map))
        if hi > lo:
            self._map.madvise(getattr(mmap, advice), lo, hi - lo)


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what norms, scales, the gate and its bias may be
MODEL_PREFIXES = ("model.", "lm_head.")  # every tensor name the model reads (spec section 6)
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
        the checkpoint (spec section 9): without any e_score_correction_bias, selection uses
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
        """Every stored dtype fits the tensor's role (headers only; spec section 7): weights,
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
                role = role_of(name)
                raise CheckpointError(f"{printable(self.file_of(name))}: tensor {printable(name)} "
                                      f"({role}) is stored as {dtype}; a {role} must be floating "
                                      "point (F32, BF16, F16 or F64, or F8_E4M3 with a "
                                      "weight_scale_inv for a 2-d weight)")
        return fp8_count

    def _scale_name(self, name: str) -> str:
        """The checked name of an FP8 tensor's scale (spec section 7)."""
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

    def weight(self, name: str, dtype=np.float64, out=None) -> np.ndarray:
        """The tensor as a float array of `dtype` (written into `out` when given: a C-contiguous
        array of its shape and dtype, e.g. a released weight's memory), FP8 dequantised with its
        weight_scale_inv, checked finite (the error names the tensor and its layer).  An FP8
        tensor is checked on its stored bytes before it is converted: no NaN code, and no product
        that can overflow `dtype` (fp8.products_finite; else the values are checked)."""
        stored = self.raw(name)
        if stored.dtype == DTYPES["F8_E4M3"]:
            sname = self._scale_name(name)
            s = self.raw(sname)
            self._check_scale(sname, s)
            self._check_finite(name, stored)
            arr = fp8.dequantize(stored, s, dtype=dtype, out=out)
            if not fp8.products_finite(s, dtype):
                self._check_finite(name, arr)
        else:
            arr = np.empty(stored.shape, dtype) if out is None else out
            if arr.shape != stored.shape or arr.dtype != np.dtype(dtype):
                raise ValueError(f"out must be a {np.dtype(dtype).name} array of shape "
                                 f"{stored.shape}, got {arr.dtype} {arr.shape}")
            np.copyto(arr, stored, casting="unsafe")  # a private, writable copy in working precision
            self._check_finite(name, arr)
        self._drop(name)
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

    def prefetch(self, name: str) -> None:
        """Start reading a tensor (and its FP8 scale) from disk in the background
        (SafetensorsFile.prefetch); a name the checkpoint lacks is ignored (a hint, not a read)."""
        for n in (name, name + "_scale_inv"):
            if n in self.where:
                self.files[self.where[n]].prefetch(n)

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
