"""Where the model's weights come from: sources (a checkpoint, arrays in memory), the store that
materialises them in the working dtype on the device under a memory budget (least recently used
released first, large matrices streamed by rows, FP8 weights optionally kept as stored), and the
budget's arithmetic (working_sets, weight_budget).  No math here: model.py asks for tensors by
their checkpoint names (names.py).
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from . import fp8, names
from .layout import layer_plan, mtp_stored
from .config import Config
from .errors import CheckpointError, InputError
from .memory import current_rss, format_bytes
from .ops import linear

# bytes kept out of the weight budget: activations, temporaries and allocator slack; the stored
# pages of the tensor being converted come on top (weight_budget)
ACTIVATION_RESERVE = 512 * 2**20
STREAM_CHUNK = 64 * 2**20  # bytes of a streamed matrix (a large lm_head) materialised at a time


class ArraySource:
    """Weights held in memory (name -> array), with the same reading interface as Checkpoint.
    An fp8.BlockFP8 entry is a weight stored in FP8 (e4m3 + block scales): read dequantised, or
    kept as stored by a store with fp8_linears (Model(fp8_activations=True))."""

    def __init__(self, cfg: Config, arrays: dict):
        self.config = cfg
        self.arrays = arrays

    def names(self):
        return list(self.arrays)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def shape(self, name):
        return tuple(self.arrays[name].shape)

    def dtype(self, name: str) -> str:
        """"F8_E4M3" for a stored-FP8 entry, else the array's numpy dtype name."""
        a = self.arrays[name]
        return "F8_E4M3" if isinstance(a, fp8.BlockFP8) else np.asarray(a).dtype.name

    def stored_fp8(self, name: str):
        """(q e4m3, scale_inv float32) of a stored-FP8 entry."""
        a = self.arrays[name]
        return a.q, a.scale_inv

    def weight(self, name, dtype=np.float64, out=None):
        """The tensor in `dtype` (into `out` when given: a C-contiguous array of its shape)."""
        if name not in self.arrays:
            raise CheckpointError(f"weights: tensor {name} is missing")
        a = self.arrays[name]
        if isinstance(a, fp8.BlockFP8):
            return fp8.dequantize(a.q, a.scale_inv, dtype=dtype, out=out)
        if out is not None:
            np.copyto(out, a, casting="unsafe")
            return out
        return np.asarray(a, dtype=dtype)


class WeightStore:
    """Materialises tensors from a source in the working dtype on the device, when first used.

    With `max_bytes` (the weight budget) it keeps at most that many bytes of materialised weights:
    before a tensor is materialised, the least recently used ones are released until it fits.
    Layers run in order and experts one at a time, so a step's working set (one layer's attention,
    one FFN, one expert) is always the most recent and is never released while in use, as long
    as the budget holds the largest working set (Model checks that up front).

    With `fp8_linears`, FP8-stored projections are kept as stored (e4m3 + scales, a BlockFP8) so
    that ops.linear runs them through the emulated FP8 GEMM (fp8.fp8_gemm).  kv_b_proj stays
    dequantised: the absorbed form splits it per head (as DeepSeek's absorbed path does)."""

    def __init__(self, source, xp, dtype, max_bytes: int | None = None, fp8_linears: bool = False):
        self.source, self.xp, self.dtype = source, xp, np.dtype(dtype)
        self.max_bytes, self.fp8_linears = max_bytes, fp8_linears
        self._resident: OrderedDict = OrderedDict()  # name -> array, least recently used first
        self.resident_bytes = 0
        self.peak_bytes = 0  # most bytes of weights held at once
        self.materialised = 0  # tensors materialised, re-reads after release included
        self.materialised_bytes = 0
        self.read_bytes = 0  # bytes of stored tensors read to materialise them
        self.reused = 0  # tensors written into a released tensor's memory (_make_room)

    def _keeps_fp8(self, name: str) -> bool:
        return (self.fp8_linears and hasattr(self.source, "dtype")
                and ".kv_b_proj." not in name and self.source.dtype(name) == "F8_E4M3")

    def _stored_fp8(self, name: str) -> bool:
        return hasattr(self.source, "stored_fp8") and self.source.dtype(name) == "F8_E4M3"

    def nbytes(self, name: str) -> int:
        """Bytes the materialised tensor takes (from the header: nothing is read)."""
        n = math.prod(self.source.shape(name))
        if self._keeps_fp8(name):
            rows, cols = fp8.scale_shape(self.source.shape(name))
            return n + 4 * rows * cols
        return n * self.dtype.itemsize

    def get(self, name: str):
        a = self._resident.get(name)
        if a is not None:
            self._resident.move_to_end(name)
            return a
        size = self.nbytes(name)
        keeps_fp8 = self._keeps_fp8(name)
        host = not keeps_fp8 and self.xp is np
        spare = self._make_room(size, (tuple(self.source.shape(name)), self.dtype) if host else None)
        if keeps_fp8:
            a = fp8.BlockFP8(*self.source.stored_fp8(name))
        elif self.xp is not np and self._stored_fp8(name):
            q, s = self.source.stored_fp8(name)  # 1 byte per weight crosses to the device
            a = fp8.dequantize_bits(self.xp.asarray(q.view(np.uint8)), s, dtype=self.dtype)
        elif self.xp is not np:
            a = self.xp.asarray(self.source.weight(name, self.dtype))  # converted on the host
        else:
            a = self.source.weight(name, self.dtype, out=spare)
            self.reused += spare is not None
        self._resident[name] = a
        self.resident_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        self.materialised += 1
        self.materialised_bytes += size
        if hasattr(self.source, "stored_nbytes"):
            self.read_bytes += self.source.stored_nbytes(name)
        return a

    def _make_room(self, size: int, like: tuple | None = None):
        """Release tensors until `size` more bytes fit the budget, the least recently used first.

        With `like` = (shape, dtype) of the tensor about to be materialised on the host: the least
        recently used resident array of that shape and dtype that nothing outside the store
        references is released first and returned, to be written over instead of freed (a fresh
        array faults in every page again: for an expert in float64 that costs about as much as
        converting it).  Under a budget smaller than what a pass touches, every tensor is read
        again anyway, so which one goes first changes nothing but this cost."""
        spare = None
        if self.max_bytes is None or self.resident_bytes + size <= self.max_bytes:
            return spare
        a = None
        if like is not None:
            for name in self._resident:  # least recently used first
                a = self._resident[name]
                # the store's dict, `a` and getrefcount's own argument: 3 when nobody else holds it
                if (isinstance(a, np.ndarray) and a.shape == like[0] and a.dtype == like[1]
                        and a.base is None and sys.getrefcount(a) <= 3):
                    break
                a = None
            if a is not None:
                spare = self.release(name)
            del a
        while self._resident and self.resident_bytes + size > self.max_bytes:
            self.release(next(iter(self._resident)))
        return spare

    def release(self, name: str):
        """Drop a materialised tensor (read again from the source when next needed) -> it."""
        a = self._resident.pop(name, None)
        if a is not None:
            self.resident_bytes -= self.nbytes(name)
        return a

    def prefetch(self, names) -> None:
        """Hint that tensors `names` are needed soon: a source that reads from disk starts
        reading those not materialised (Checkpoint.prefetch), so that the disk works while the
        current layer computes.  Changes no result."""
        hint = getattr(self.source, "prefetch", None)
        if hint is not None:
            for n in names:
                if n not in self._resident:
                    hint(n)

    def rows(self, name: str, ids):
        """Rows `ids` of a 2-d tensor (an embedding lookup): resident if it is, else read from
        the source without materialising the whole matrix.   ids int [...] -> [..., cols]"""
        a = self._resident.get(name)
        if a is not None or not hasattr(self.source, "rows"):
            return self.get(name)[self.xp.asarray(ids)]
        return self.xp.asarray(self.source.rows(name, np.asarray(ids), self.dtype))

    def linear(self, x, name: str):
        """linear(x, W) for tensor `name`; a matrix too large for half the budget (a 129280-row
        lm_head in float64) is streamed in row chunks instead of held.   [..., in] -> [..., out]"""
        if (self.max_bytes is None or name in self._resident or not hasattr(self.source, "rows")
                or self.nbytes(name) <= self.max_bytes // 2):
            return linear(x, self.get(name))
        out_rows, cols = self.source.shape(name)
        step = max(1, STREAM_CHUNK // (cols * self.dtype.itemsize))
        parts = [linear(x, self.xp.asarray(self.source.rows(name, np.arange(a, min(a + step, out_rows)),
                                                            self.dtype)))
                 for a in range(0, out_rows, step)]
        return self.xp.concatenate(parts, axis=-1)

    def group(self, prefix: str, keys) -> dict:
        """{key: get(prefix + key + '.weight')} for checkpoint keys (`q_a_proj`, ...)."""
        return {k: self.get(names.weight(prefix, k)) for k in keys}

    def optional(self, name: str):
        """The tensor when the source holds it, else None (the gate bias: whether it exists is
        the checkpoint's answer, spec section 9)."""
        return self.get(name) if name in self.source else None

    def has_mtp(self, cfg: Config, depths: int | None = None) -> bool:
        """True when the source holds every tensor of MTP modules 1..depths (default: all
        num_nextn_predict_layers), the optional gate bias aside."""
        return mtp_stored(cfg, set(self.source.names()), depths)


class LazyGroup(Mapping):
    """{key: tensor} for checkpoint keys under a prefix, each read from the store only when looked
    up: a block that takes a weight dict reads it when it uses it (`**group` reads all keys at
    that point), not when it is handed over."""

    def __init__(self, store: WeightStore, prefix: str, keys):
        self.store, self.prefix, self.keys_ = store, prefix, tuple(keys)

    def __getitem__(self, key: str):
        if key not in self.keys_:
            raise KeyError(key)
        return self.store.get(names.weight(self.prefix, key))

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


class ExpertView:
    """experts[e] -> {gate_proj, up_proj, down_proj} of routed expert e of `layer`, read when
    first asked."""

    def __init__(self, store: WeightStore, layer: int):
        self.store, self.layer = store, layer

    def __getitem__(self, e: int) -> dict:
        return self.store.group(names.expert(self.layer, e), names.FFN_PROJ)

    def prefetch(self, experts) -> None:
        """The routed experts `experts` (ids) will be read next (WeightStore.prefetch)."""
        self.store.prefetch([names.weight(names.expert(self.layer, int(e)), k)
                             for e in experts for k in names.FFN_PROJ])


def working_sets(cfg: Config, layer: int) -> list[list[str]]:
    """The tensors a step of `layer` holds at once: its norms, its attention, its dense FFN, or
    its gate, shared experts and ONE routed expert (experts run one at a time)."""
    plan = list(layer_plan(cfg, layer))
    attn = [n for n in plan if n.startswith(names.attention(layer))]
    norms = [names.input_norm(layer), names.post_attention_norm(layer)]
    ffn = [n for n in plan if n.startswith(names.mlp(layer)) and ".experts." not in n]
    expert = [n for n in plan if n.startswith(names.expert(layer, 0))]
    mtp = [names.enorm(layer), names.hnorm(layer), names.eh_proj(layer)] \
        if layer >= cfg.num_hidden_layers else []
    return [attn + norms, ffn, expert, mtp]


def shared_tensors(cfg: Config, layer: int) -> list[str]:
    """Every tensor of `layer` that every token uses: working_sets without the routed experts
    (what is worth reading ahead of the layer; experts are read ahead once routed)."""
    attn, ffn, _, mtp = working_sets(cfg, layer)
    return attn + ffn + mtp


def weight_budget(store: WeightStore, cfg: Config, max_memory: int) -> int:
    """Bytes of weights the store may hold so that the process stays under `max_memory`: what is
    left after the memory in use now, ACTIVATION_RESERVE, and the largest stored tensor (its
    mapped pages are resident while it is converted).  Refused (naming the tensors) when that
    cannot hold the largest working set; the embedding is read by rows and a large lm_head is
    streamed, so neither must fit."""
    stored = set(store.source.names())
    pages = max((store.source.stored_nbytes(n) for n in stored if names.layer_of(n) is not None),
                default=0) if hasattr(store.source, "stored_nbytes") else 0
    reserve = ACTIVATION_RESERVE + pages
    budget = max_memory - current_rss() - reserve
    need, worst = 0, []
    for layer in range(cfg.num_layers_with_mtp):  # MTP layers count when they are stored
        for step in working_sets(cfg, layer):
            size = sum(store.nbytes(n) for n in step if n in stored)
            if size > need:
                need, worst = size, step
    if budget < need:
        what = worst[0].rsplit(".", 2)[0] + "..." if worst else "weights"
        raise InputError(f"--max-memory {format_bytes(max_memory)} is too small: after "
                         f"{format_bytes(current_rss())} in use and a {format_bytes(reserve)} "
                         f"reserve for activations and reading, {format_bytes(max(budget, 0))} "
                         f"is left for weights, "
                         f"but one step ({what}) needs {format_bytes(need)} in {store.dtype.name}")
    return budget
