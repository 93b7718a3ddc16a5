"""Writing checkpoints in the Hugging Face layout: safetensors files (atomically, tensors produced
one at a time), sharded checkpoint directories with their index, and synthetic well-scaled
models (`refimpl make-checkpoint`, the test suites' weights).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import zlib

import numpy as np

from . import fp8
from .atomic import atomic_directory, atomic_file, check_destination, write_text
from .config import Config
from .errors import CheckpointError, printable
from .layout import DTYPE_NAMES, DTYPES, FP8_QUANT_CONFIG, STORAGE_BYTES, stored_entries, tensor_plan


# ---------------------------------------------------------------------------------------------
# safetensors, write
# ---------------------------------------------------------------------------------------------

def write_safetensors(path: str, tensors: dict, metadata: dict | None = None, file=None) -> None:
    """Write `tensors` (name -> numpy array) as one safetensors file, atomically: a temporary
    name in the same directory, renamed when complete (or into `file`, an open binary file the
    caller owns, e.g. a private temporary)."""
    arrays = {}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {a.dtype}, not storable")
        arrays[name] = a
    entries = [(n, DTYPE_NAMES[a.dtype], a.shape) for n, a in arrays.items()]
    write_safetensors_planned(path, entries, arrays.__getitem__, metadata, file)


def write_safetensors_planned(path: str, entries, produce, metadata: dict | None = None,
                              file=None) -> None:
    """Write one safetensors file whose header comes from a plan, `entries` = [(name, dtype
    name, shape)], asking `produce(name)` for each array only when its turn comes (so a shard
    never needs more memory than its largest tensor).  Atomic: temporary name, then rename
    (`file` given: written into that open binary file, no rename)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * STORAGE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with (contextlib.nullcontext(file) if file is not None else atomic_file(path, CheckpointError)) as f:
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
    e4m3 with 128x128 block scales (spec section 7); optionally in `shards` files."""
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
