"""The model: embedding, decoder layers (MLA + dense FFN or DeepSeekMoE, pre-norm residual),
final norm, lm_head; prefill and incremental decode through the latent cache; named traces.

    h = Emb(tokens)
    for each layer:  h = h + MLA(RMSNorm(h));  h = h + FFN_or_MoE(RMSNorm(h))
    logits = lm_head(RMSNorm(h))
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import fp8, mla, moe, rope
from .backend import device_module, to_numpy, working_dtype
from .checkpoint import Checkpoint, layer_of
from .config import Config
from .errors import CheckpointError, InputError, RefimplError
from .norm import rms_norm
from .ops import linear

MLA_FORMS = ("naive", "absorbed", "auto")


@dataclass
class LatentCache:
    """What MLA caches: per layer the normalised c^KV [batch, max_len, d_c] and the roped k^R
    [batch, max_len, d_R], i.e. d_c + d_R values per token per layer (576 for V3). `length`
    tokens are filled; the next forward continues at position `length`."""

    c_kv: list
    k_rope: list
    length: int = 0
    # MTP module k (mtp.py) uses slot num_hidden_layers + k - 1 and has its own filled length
    mtp_lengths: list = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.c_kv[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.c_kv[0].shape[1]


class ArraySource:
    """Weights held in memory (name -> array), with the same reading interface as Checkpoint."""

    def __init__(self, cfg: Config, arrays: dict):
        self.config = cfg
        self.arrays = arrays

    def names(self):
        return list(self.arrays)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def shape(self, name):
        return tuple(self.arrays[name].shape)

    def weight(self, name, dtype=np.float64):
        if name not in self.arrays:
            raise CheckpointError(f"weights: tensor {name} is missing")
        return np.asarray(self.arrays[name], dtype=dtype)


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
        self._make_room(size)
        if self._keeps_fp8(name):
            a = fp8.BlockFP8(*self.source.stored_fp8(name))
        elif self.xp is not np and self._stored_fp8(name):
            q, s = self.source.stored_fp8(name)  # 1 byte per weight crosses to the device
            a = fp8.dequantize_bits(self.xp.asarray(q.view(np.uint8)), s, dtype=self.dtype)
        else:
            a = self.xp.asarray(self.source.weight(name, self.dtype))
        self._resident[name] = a
        self.resident_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        self.materialised += 1
        self.materialised_bytes += size
        if hasattr(self.source, "stored_nbytes"):
            self.read_bytes += self.source.stored_nbytes(name)
        return a

    def _make_room(self, size: int) -> None:
        if self.max_bytes is None:
            return
        while self._resident and self.resident_bytes + size > self.max_bytes:
            self.release(next(iter(self._resident)))

    def release(self, name: str) -> None:
        """Drop a materialised tensor (read again from the source when next needed)."""
        a = self._resident.pop(name, None)
        if a is not None:
            self.resident_bytes -= self.nbytes(name)

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
        return {k: self.get(f"{prefix}{k}.weight") for k in keys}


class ExpertView:
    """experts[e] -> {gate_proj, up_proj, down_proj} of routed expert e, read when first asked."""

    def __init__(self, store: WeightStore, prefix: str):
        self.store, self.prefix = store, prefix

    def __getitem__(self, e: int) -> dict:
        return self.store.group(f"{self.prefix}{e}.", ("gate_proj", "up_proj", "down_proj"))


def _record(trace, name, value):
    if trace is not None:
        trace[name] = to_numpy(value)


class Model:
    """A DeepSeek-V3 (or V2) model over a weight source. Use `load()` for a checkpoint directory
    or `Model.from_arrays()` for weights in memory."""

    def __init__(self, cfg: Config, source, dtype="float64", device="cpu", mla_form="auto",
                 max_memory: int | None = None, fp8_activations: bool = False):
        if mla_form not in MLA_FORMS:
            raise RefimplError(f"mla_form {mla_form!r} is not one of {', '.join(MLA_FORMS)}")
        self.cfg = cfg
        self.dtype = working_dtype(dtype)
        self.device = device
        self.xp = device_module(device)
        self.mla_form = mla_form
        if fp8_activations and device != "cpu":
            raise RefimplError("fp8_activations (the FP8 GEMM emulation) runs on the cpu only")
        self.max_memory = max_memory
        self.weights = WeightStore(source, self.xp, self.dtype, fp8_linears=fp8_activations)
        if max_memory is not None:
            self.weights.max_bytes = weight_budget(self.weights, cfg, max_memory)
        self.inv_freq = rope.inv_freq(cfg)
        self.cos_sin_factor = rope.cos_sin_factor(cfg)
        self.softmax_scale = rope.softmax_scale(cfg)
        # progress(iterable, desc=...) -> iterable, e.g. tqdm: set by the command line on a
        # terminal so a long forward shows its layers; None (quiet) for library use.
        self.progress = None

    @classmethod
    def from_arrays(cls, cfg: Config, arrays: dict, **kw) -> "Model":
        return cls(cfg, ArraySource(cfg, arrays), **kw)

    # ---- cache ---------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, max_len: int | None = None, mtp: bool = False) -> LatentCache:
        """An empty latent cache for `batch` rows of up to `max_len` tokens (default: 4096, or
        max_position_embeddings if smaller: V3's 163,840 positions would be 46 GB in float64).
        With mtp=True it also has one slot per MTP module (num_nextn_predict_layers more, each
        with its own length in mtp_lengths)."""
        cfg, xp = self.cfg, self.xp
        max_len = min(4096, cfg.max_position_embeddings) if max_len is None else max_len
        if max_len < 1 or max_len > cfg.max_position_embeddings:
            raise InputError(f"cache max_len {max_len} must be in 1..max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        n = cfg.num_layers_with_mtp if mtp else cfg.num_hidden_layers
        return LatentCache(
            c_kv=[xp.zeros((batch, max_len, cfg.kv_lora_rank), self.dtype) for _ in range(n)],
            k_rope=[xp.zeros((batch, max_len, cfg.qk_rope_head_dim), self.dtype) for _ in range(n)],
            mtp_lengths=[0] * (cfg.num_nextn_predict_layers if mtp else 0))

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, tokens, cache: LatentCache | None = None, trace: dict | None = None,
                mtp: bool = False, mtp_conventions=None):
        """tokens int [batch, seq] -> logits [batch, seq, vocab] (working dtype, on the device).

        With a cache, the tokens continue at position cache.length and the cache advances.
        With a trace dict, the named intermediates are stored in it in dataflow order.
        With mtp=True (teacher forcing over the whole sequence, no cache), returns
        (logits, [mtp logits of depth k = 1..D, each [batch, seq-k, vocab]]): module k at index i
        predicts t_{i+k+1} (mtp.py; conventions from mtp.Conventions, default mtp.DEFAULT)."""
        if mtp:
            return self._forward_mtp(tokens, cache, trace, mtp_conventions)
        h = self.hidden_states(tokens, cache, trace)
        return self.logits(h, trace)

    def _forward_mtp(self, tokens, cache, trace, conv):
        from . import mtp as mtp_mod

        if cache is not None:
            raise InputError("forward(mtp=True) is teacher-forced over a whole sequence and takes "
                             "no cache; decode incrementally with mtp.Drafter")
        if not mtp_mod.has_weights(self):
            raise InputError("forward(mtp=True): the weights hold no MTP layers (layer "
                             f"{self.cfg.num_hidden_layers} and on)")
        conv = conv or mtp_mod.DEFAULT
        tokens = self.check_tokens(tokens)
        h0, h = mtp_mod.main_hidden(self, tokens, None, trace, conv)
        logits = self.logits(h, trace)
        return logits, mtp_mod.teacher_forced(self, tokens, h0, trace, conv)

    def hidden_states(self, tokens, cache=None, trace=None, final_norm=True):
        """The final hidden state after the last norm: [batch, seq, d] (with final_norm=False,
        the last decoder layer's output, before that norm)."""
        cfg, xp = self.cfg, self.xp
        tokens = self.check_tokens(tokens)
        b, s = tokens.shape
        start = 0
        if cache is not None:
            start = cache.length
            if cache.batch != b:
                raise InputError(f"tokens have batch {b} but the cache was made for {cache.batch}")
            if start + s > cache.max_len:
                raise InputError(f"{s} tokens at position {start} overflow the cache of "
                                 f"{cache.max_len} positions")
        if start + s > cfg.max_position_embeddings:
            raise InputError(f"positions up to {start + s - 1} exceed max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        positions = np.arange(start, start + s)
        cos, sin = rope.cos_sin(positions, self.inv_freq, self.cos_sin_factor, xp)
        mask = mla.causal_mask(positions, np.arange(start + s), xp)
        h = self.weights.rows("model.embed_tokens.weight", tokens)  # [b, s] -> [b, s, d]
        _record(trace, "embed", h)
        layers = range(cfg.num_hidden_layers)
        if self.progress is not None:
            layers = self.progress(layers, desc=f"forward of {b}x{s} tokens", unit="layer")
        for i in layers:
            h = self.decoder_layer(i, h, cos, sin, mask, start, cache, trace)
        if cache is not None:
            cache.length = start + s
        if not final_norm:
            return h
        h = rms_norm(h, self.weights.get("model.norm.weight"), cfg.rms_norm_eps)
        _record(trace, "final_hidden", h)
        return h

    def logits(self, h, trace=None):
        """lm_head(h): [batch, seq, d] -> [batch, seq, vocab]."""
        head = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        out = self.weights.linear(h, head)
        _record(trace, "logits", out)
        return out

    def check_tokens(self, tokens) -> np.ndarray:
        """Integer ids of rank 2, each in [0, vocab_size)."""
        t = to_numpy(tokens)
        if t.ndim != 2:
            raise InputError(f"tokens must be an integer array [batch, seq], got rank {t.ndim}")
        if not np.issubdtype(t.dtype, np.integer):
            raise InputError(f"tokens must be integers, got dtype {t.dtype}")
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise InputError(f"tokens must hold at least one id, got shape {list(t.shape)}")
        bad = (t < 0) | (t >= self.cfg.vocab_size)
        if bad.any():
            where = tuple(int(x) for x in np.argwhere(bad)[0])
            raise InputError(f"token id {int(t[where])} at {list(where)} is outside the "
                             f"vocabulary [0, {self.cfg.vocab_size})")
        return t.astype(np.int64)

    # ---- one decoder layer ---------------------------------------------------------------------
    def decoder_layer(self, i, h, cos, sin, mask, start, cache, trace, prefix=None):
        """Pre-norm residual block: h + MLA(norm(h)), then + FFN/MoE(norm(.))."""
        cfg, w = self.cfg, self.weights
        p = f"model.layers.{i}."
        name = prefix or f"layers.{i}."
        x = rms_norm(h, w.get(p + "input_layernorm.weight"), cfg.rms_norm_eps)
        _record(trace, name + "attn_norm", x)
        a = self.attention(i, x, cos, sin, mask, start, cache, trace, name)
        h = h + a
        _record(trace, name + "h_attn", h)
        x = rms_norm(h, w.get(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
        _record(trace, name + "ffn_norm", x)
        f = self.moe(i, x, trace, name) if cfg.is_moe_layer(i) else self.dense_ffn(i, x)
        _record(trace, name + "ffn_out", f)
        h = h + f
        _record(trace, name + "hidden", h)
        return h

    def attention(self, i, x, cos, sin, mask, start, cache, trace, name, cache_layer=None):
        """MLA for layer i on normalised x [b, s, d] -> [b, s, d]; writes the cache if given."""
        cfg = self.cfg
        keys = (("q_proj",) if cfg.q_lora_rank is None else ("q_a_proj", "q_a_layernorm", "q_b_proj")) \
            + ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
        w = self.weights.group(f"model.layers.{i}.self_attn.", keys)
        c_q, q_nope, q_rope = mla.query(x, w, cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                        cfg.qk_rope_head_dim)
        c_kv, k_rope = mla.latent_kv(x, w, cfg.kv_lora_rank)
        q_rope, k_rope = mla.rope_parts(q_rope, k_rope, cos, sin)
        if c_q is not None:
            _record(trace, name + "c_q", c_q)
        for n, v in (("q_nope", q_nope), ("q_rope", q_rope), ("c_kv", c_kv), ("k_rope", k_rope)):
            _record(trace, name + n, v)
        s = x.shape[1]
        if cache is not None:  # append to the latent cache, attend over everything in it
            layer = i if cache_layer is None else cache_layer
            cache.c_kv[layer][:, start:start + s] = c_kv
            cache.k_rope[layer][:, start:start + s] = k_rope
            c_kv = cache.c_kv[layer][:, :start + s]
            k_rope = cache.k_rope[layer][:, :start + s]
        form = self.mla_form
        if form == "auto":
            form = "absorbed" if start > 0 else "naive"
        attend = mla.attention_absorbed if form == "absorbed" else mla.attention_naive
        o = attend(q_nope, q_rope, c_kv, k_rope, w["kv_b_proj"], self.softmax_scale, mask)
        out = mla.output(o, w["o_proj"])
        _record(trace, name + "attn_out", out)
        return out

    def dense_ffn(self, i, x):
        """The first first_k_dense_replace layers: one SwiGLU FFN."""
        w = self.weights.group(f"model.layers.{i}.mlp.", ("gate_proj", "up_proj", "down_proj"))
        b, s, d = x.shape
        return moe.swiglu(x.reshape(b * s, d), **w).reshape(b, s, d)

    def moe(self, i, x, trace, name):
        """eq. (12) without the residual: shared experts + gated routed experts."""
        cfg, w = self.cfg, self.weights
        p = f"model.layers.{i}.mlp."
        b, s, d = x.shape
        u = x.reshape(b * s, d)  # [T, d]
        bias_name = p + "gate.e_score_correction_bias"  # present or not as the checkpoint says
        bias = w.get(bias_name) if cfg.uses_bias and bias_name in w.source else None
        scores, idx, g = moe.route(u, w.get(p + "gate.weight"), bias, cfg)
        _record(trace, name + "router_scores", scores.reshape(b, s, -1))
        _record(trace, name + "topk_idx", idx.reshape(b, s, -1))
        _record(trace, name + "topk_weight", g.reshape(b, s, -1))
        out = moe.routed_experts(u, idx, g, ExpertView(w, p + "experts."))
        if cfg.n_shared_experts:
            out = out + moe.swiglu(u, **w.group(p + "shared_experts.",
                                                ("gate_proj", "up_proj", "down_proj")))
        return out.reshape(b, s, d)


# bytes kept out of the weight budget: activations, temporaries and allocator slack; the stored
# pages of the tensor being converted come on top (weight_budget)
ACTIVATION_RESERVE = 512 * 2**20
STREAM_CHUNK = 64 * 2**20  # bytes of a streamed matrix (a large lm_head) materialised at a time


def working_sets(cfg: Config, layer: int) -> list[list[str]]:
    """The tensors a step of `layer` holds at once: its norms, its attention, its dense FFN, or
    its gate, shared experts and ONE routed expert (experts run one at a time)."""
    from .checkpoint import layer_plan

    plan = list(layer_plan(cfg, layer))
    p = f"model.layers.{layer}."
    attn = [n for n in plan if n.startswith(p + "self_attn.")]
    norms = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    ffn = [n for n in plan if n.startswith(p + "mlp.") and ".experts." not in n]
    expert = [n for n in plan if n.startswith(p + "mlp.experts.0.")]
    mtp = [p + k for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight")] \
        if layer >= cfg.num_hidden_layers else []
    return [attn + norms, ffn, expert, mtp]


def weight_budget(store: WeightStore, cfg: Config, max_memory: int) -> int:
    """Bytes of weights the store may hold so that the process stays under `max_memory`: what is
    left after the memory in use now, ACTIVATION_RESERVE, and the largest stored tensor (its
    mapped pages are resident while it is converted).  Refused (naming the tensors) when that
    cannot hold the largest working set; the embedding is read by rows and a large lm_head is
    streamed, so neither must fit."""
    from .memory import current_rss, format_bytes

    stored = set(store.source.names())
    pages = max((store.source.stored_nbytes(n) for n in stored if layer_of(n) is not None),
                default=0) if hasattr(store.source, "stored_nbytes") else 0
    reserve = ACTIVATION_RESERVE + pages
    budget = max_memory - current_rss() - reserve
    need, worst = 0, []
    for layer in range(cfg.num_layers_with_mtp):  # MTP layers count when they are stored
        for names in working_sets(cfg, layer):
            size = sum(store.nbytes(n) for n in names if n in stored)
            if size > need:
                need, worst = size, names
    if budget < need:
        what = worst[0].rsplit(".", 2)[0] + "..." if worst else "weights"
        raise InputError(f"--max-memory {format_bytes(max_memory)} is too small: after "
                         f"{format_bytes(current_rss())} in use and a {format_bytes(reserve)} "
                         f"reserve for activations and reading, {format_bytes(max(budget, 0))} "
                         f"is left for weights, "
                         f"but one step ({what}) needs {format_bytes(need)} in {store.dtype.name}")
    return budget


def load(path: str | os.PathLike, dtype="float64", device="cpu", mla_form="auto",
         max_memory: int | None = None, fp8_activations: bool = False) -> Model:
    """Open a checkpoint directory (HF layout): reads config.json and the safetensors headers,
    checks every tensor the config implies is present with its shape and every FP8 scale fits
    its weight; tensor bodies are read when first used.

    max_memory (bytes): keep the process under it by releasing the least recently used weights
    (see WeightStore).  fp8_activations: run FP8-stored projections as an FP8 engine does
    (activations quantised per token per 128 channels, float32 accumulation; fp8.fp8_gemm)."""
    ckpt = Checkpoint(path)
    ckpt.check_against_config()
    ckpt.check_scales()
    return Model(ckpt.config, ckpt, dtype=dtype, device=device, mla_form=mla_form,
                 max_memory=max_memory, fp8_activations=fp8_activations)
