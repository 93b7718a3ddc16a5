"""Pipeline stages: the decoder layers split into contiguous runs, each kept resident by one
worker (a Ray actor on a CPU host or on its own GPU, or an object in this process), the hidden
state passed from stage to stage, each stage holding its layers' slice of the latent cache.
The first stage also holds the embedding; the last the final norm, the head and the MTP
modules.  The arithmetic is Model's own (layer.decoder_layer on the same AttentionContext), so a pipeline
gives one process's results bit for bit when the stages compute as that process does (the same
numpy, BLAS and thread count: RayStages passes the driver's BLAS thread settings on).

    plan = plan_stages(cfg, 2, "float64", present=ckpt.names())   # headers only
    print(format_plan(plan, "float64")); check_fits(plan, stage_memory)
    pipe = Pipeline.start(source, plan, executor)                  # weights are read here
    logits = pipe.forward(tokens)                                  # Model's interface

The executor decides where stages live: LocalStages (this process, one after another: the
semantics without a cluster) or RayStages (refimpl.cluster: one actor per stage).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import numpy as np

from . import names
from .backend import to_numpy
from .checkpoint import Checkpoint
from .config import Config
from .errors import InputError, RefimplError
from .layer import LatentCache, decoder_layer
from .layout import STORAGE_BYTES, is_fp8_weight, layer_plan
from .memory import format_bytes
from .model import Model
from .mtp import DEFAULT as MTP_DEFAULT, Conventions
from .norm import rms_norm
from .trace import recorder
from .weights import ArraySource

STORAGES = ("float", "fp8")  # weights held in the working dtype, or FP8 projections as stored


# ---- the plan: which layers where, and how many bytes -------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    """One stage: decoder layers first..last-1, and what else it holds."""

    index: int
    first_layer: int
    last_layer: int  # exclusive
    embedding: bool  # the first stage: model.embed_tokens
    head: bool  # the last stage: final norm, head, MTP layers
    tensors: tuple  # every tensor name it keeps resident
    nbytes: int  # their bytes at the plan's dtype and storage

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer)

    def describe(self) -> str:
        what = f"layers {self.first_layer}-{self.last_layer - 1}"
        extra = (["embedding"] if self.embedding else []) + (["norm, head, MTP"] if self.head else [])
        return what + (f" + {', '.join(extra)}" if extra else "")


def tensor_bytes(name: str, shape, dtype, storage: str) -> int:
    """Bytes a resident tensor takes: numel x itemsize, or for storage "fp8" the published
    layout's bytes for an FP8 projection (1 per value plus float32 scales per 128x128 block)."""
    n = math.prod(shape)
    if storage == "fp8" and is_fp8_weight(name) and len(shape) == 2:
        return n + STORAGE_BYTES["F32"] * math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
    return n * np.dtype(dtype).itemsize


def _present(plan: dict, present) -> dict:
    return plan if present is None else {n: s for n, s in plan.items() if n in present}


def plan_stages(cfg: Config, n: int, dtype="float64", storage: str = "float",
                present=None) -> list[StageSpec]:
    """The decoder layers split into `n` contiguous stages whose resident bytes are as even as
    possible (the largest stage as small as it can be; the embedding counts on the first stage,
    the final norm, head and MTP layers on the last).  `present`: the tensor names a checkpoint
    holds (optional MTP layers and gate biases are planned only when present)."""
    L = cfg.num_hidden_layers
    if not 1 <= n <= L:
        raise InputError(f"--stages {n}: must be between 1 and the {L} decoder layers")
    if storage not in STORAGES:
        raise InputError(f"storage {storage!r} is not one of {', '.join(STORAGES)}")

    def size(plan):
        return sum(tensor_bytes(k, s, dtype, storage) for k, s in plan.items())
    layer_t = [_present(layer_plan(cfg, i), present) for i in range(L)]
    first_t = _present({names.EMBED: (cfg.vocab_size, cfg.hidden_size)}, present)
    last_t = _present({names.FINAL_NORM: (cfg.hidden_size,),
                       names.head(cfg): (cfg.vocab_size, cfg.hidden_size)}, present)
    for layer in range(L, cfg.num_layers_with_mtp):
        last_t.update(_present(layer_plan(cfg, layer), present))
    if cfg.tie_word_embeddings:
        last_t.pop(names.EMBED, None)
    cost = [size(p) for p in layer_t]
    first, last = size(first_t), size(last_t)
    prefix = np.concatenate([[0], np.cumsum(cost)])

    def part(a, b):  # bytes of a stage holding layers a..b-1
        return int(prefix[b] - prefix[a]) + (first if a == 0 else 0) + (last if b == L else 0)
    # best[k][b]: the smallest largest stage when layers 0..b-1 form k stages (cut points kept)
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for b in range(k, L + 1):
            for a in range(k - 1, b):
                v = max(best[k - 1][a], part(a, b))
                if v < best[k][b]:
                    best[k][b], cut[k][b] = v, a
    bounds, b = [], L
    for k in range(n, 0, -1):
        bounds.append((cut[k][b], b))
        b = cut[k][b]
    specs = []
    for i, (a, b) in enumerate(reversed(bounds)):
        t = {}
        if a == 0:
            t.update(first_t)
        for layer in range(a, b):
            t.update(layer_t[layer])
        if b == L:
            t.update(last_t)
        specs.append(StageSpec(i, a, b, a == 0, b == L, tuple(t), part(a, b)))
    return specs


def format_plan(plan: list[StageSpec], dtype, storage: str = "float") -> str:
    """The plan as printed before any weight is read."""
    lines = [f"pipeline plan: {len(plan)} stage(s), weights resident in "
             f"{np.dtype(dtype).name if storage == 'float' else 'FP8 as stored'}"]
    for s in plan:
        lines.append(f"  stage {s.index}: {s.describe():<40} {len(s.tensors):>7,} tensors "
                     f"{format_bytes(s.nbytes):>10}")
    return "\n".join(lines)


def check_fits(plan: list[StageSpec], stage_memory: int | None) -> None:
    """Refuse (one line, naming the stage) a plan whose stage holds more than stage_memory."""
    if stage_memory is None:
        return
    for s in plan:
        if s.nbytes > stage_memory:
            raise InputError(f"stage {s.index} ({s.describe()}) needs {format_bytes(s.nbytes)} of "
                             f"weights, more than --stage-memory {format_bytes(stage_memory)}; "
                             "use more stages or a smaller dtype")


# ---- a stage -------------------------------------------------------------------------------------

def open_source(source):
    """A picklable description of the weights -> (config, weight source).
    ("checkpoint", path) or ("arrays", config dict, {name: array})."""
    kind = source[0]
    if kind == "checkpoint":
        ckpt = Checkpoint(source[1])
        return ckpt.config, ckpt
    cfg = Config.from_dict(source[1])
    return cfg, ArraySource(cfg, source[2])


class StageWorker:
    """One stage's weights, kept resident, and its slice of every latent cache.  Runs in a Ray
    actor or in this process; every argument and result is host numpy (an explicit copy to and
    from the stage's device), so that nothing device-bound crosses a process boundary."""

    def __init__(self, source, spec: StageSpec, dtype="float64", device="cpu", mla_form="auto"):
        if isinstance(device, str) and device.startswith("module:"):  # an injected array module
            device = importlib.import_module(device[len("module:"):])
        cfg, src = open_source(source)
        self.spec, self.cfg = spec, cfg
        self.model = Model(cfg, src, dtype=dtype, device=device, mla_form=mla_form)
        for name in spec.tensors:  # resident from now on: read once, at start
            if not (name == names.EMBED and hasattr(src, "rows") and not spec.embedding):
                self.model.weights.get(name)
        self.caches: dict = {}

    def ready(self) -> dict:
        w = self.model.weights
        return {"stage": self.spec.index, "tensors": len(w._resident), "bytes": w.resident_bytes}

    def new_cache(self, cache_id: int, batch: int, max_len: int, mtp_slots: bool) -> None:
        """This stage's slots of a latent cache: full size for its own layers (and, on the last
        stage, the MTP layers), empty elsewhere."""
        cfg, xp, dt = self.cfg, self.model.xp, self.model.dtype
        n = cfg.num_layers_with_mtp if mtp_slots else cfg.num_hidden_layers
        own = set(self.spec.layers) | (set(range(cfg.num_hidden_layers, n)) if self.spec.head else set())

        def slot(i, width):
            return xp.zeros((batch, max_len, width if i in own else 0), dt)
        self.caches[cache_id] = LatentCache(
            c_kv=[slot(i, cfg.kv_lora_rank) for i in range(n)],
            k_rope=[slot(i, cfg.qk_rope_head_dim) for i in range(n)],
            mtp_lengths=[0] * (cfg.num_nextn_predict_layers if mtp_slots else 0))

    def drop_cache(self, cache_id: int) -> None:
        self.caches.pop(cache_id, None)

    def embed(self, tokens) -> np.ndarray:
        return to_numpy(self.model.weights.rows(names.EMBED, np.asarray(tokens)))

    def layers(self, h, start: int, cache_id=None, trace: bool = False):
        """This stage's decoder layers on h [b, s, d] at positions start..start+s-1
        -> (h, {trace name: array} or None)."""
        m = self.model
        h = m.xp.asarray(np.asarray(h, dtype=m.dtype))
        s = h.shape[1]
        cache = None if cache_id is None else self.caches[cache_id]
        context = m.attention_context(np.arange(start, start + s), start + s, start, cache)
        tr = {} if trace else None
        for i in self.spec.layers:
            h = decoder_layer(h, m.weights, self.cfg, i, context, recorder(tr, f"layers.{i}."))
        return to_numpy(h), tr

    def final_norm(self, h) -> np.ndarray:
        m = self.model
        h = m.xp.asarray(np.asarray(h, dtype=m.dtype))
        return to_numpy(rms_norm(h, m.weights.get(names.FINAL_NORM), self.cfg.rms_norm_eps))

    def logits(self, h, trace: bool = False):
        m = self.model
        tr = {} if trace else None
        out = m.logits(m.xp.asarray(np.asarray(h, dtype=m.dtype)), tr)
        return to_numpy(out), tr

    def mtp_module(self, k, tokens_k, h_prev, start, cache_id, trace, conv: dict):
        m = self.model
        cache = None if cache_id is None else self.caches[cache_id]
        tr = {} if trace else None
        h, logits = m.mtp_module(k, np.asarray(tokens_k), m.xp.asarray(np.asarray(h_prev, m.dtype)),
                                 start, cache, tr, Conventions(**conv))
        return to_numpy(h), to_numpy(logits), tr

    def has_mtp(self, depths=None) -> bool:
        return self.model.has_mtp(depths)


# ---- executors: where the stages live ------------------------------------------------------------

class LocalStages:
    """Every stage an object in this process, run one after another (no cluster): the
    pipeline's semantics, used by the tests and when --stages is given without --ray."""

    def start(self, source, plan, dtype, device, mla_form) -> list:
        return [StageWorker(source, spec, dtype, device, mla_form) for spec in plan]

    def call(self, stage, method: str, *args, returns: int = 1):
        return getattr(stage, method)(*args)

    def get(self, ref, plan=None):
        return ref


# ---- the driver: Model's interface over the stages ------------------------------------------------

@dataclass
class PipelineCache:
    """A latent cache whose slots live in the stages (StageWorker.new_cache): the driver keeps
    the lengths, as LatentCache does; `c_kv` lists the slots that exist (their arrays are in
    the stages)."""

    cache_id: int
    batch: int
    max_len: int
    slots: int
    length: int = 0
    mtp_lengths: list = field(default_factory=list)

    @property
    def c_kv(self) -> list:
        return [None] * self.slots


class Pipeline:
    """A model split into stages, with Model's interface (forward, new_cache, hidden_states,
    logits, main_hidden, mtp_module, has_mtp, check_tokens): generate.decode, greedy and the
    command line run it as they run a Model.  Arrays on the driver are host numpy."""

    def __init__(self, cfg: Config, plan: list[StageSpec], stages: list, executor, dtype):
        self.cfg, self.plan, self.stages, self.ex = cfg, plan, stages, executor
        self.dtype = np.dtype(dtype)
        self.xp = np
        self.progress = None
        self._next_cache = 0

    @classmethod
    def start(cls, source, plan, executor, dtype="float64", device="cpu", mla_form="auto"):
        cfg, _ = open_source(source) if source[0] == "checkpoint" else (Config.from_dict(source[1]), None)
        stages = executor.start(source, plan, dtype, device, mla_form)
        pipe = cls(cfg, plan, stages, executor, dtype)
        pipe.ready = [pipe._get(executor.call(s, "ready")) for s in stages]
        return pipe

    def _get(self, ref):
        return self.ex.get(ref, self.plan)

    @property
    def first(self):
        return self.stages[0]

    @property
    def last(self):
        return self.stages[-1]

    def check_tokens(self, tokens) -> np.ndarray:
        return Model.check_tokens(self, tokens)

    def new_cache(self, batch: int = 1, max_len: int | None = None, mtp: bool = False) -> PipelineCache:
        cfg = self.cfg
        max_len = min(4096, cfg.max_position_embeddings) if max_len is None else max_len
        if max_len < 1 or max_len > cfg.max_position_embeddings:
            raise InputError(f"cache max_len {max_len} must be in 1..max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        cid, self._next_cache = self._next_cache, self._next_cache + 1
        for ref in [self.ex.call(s, "new_cache", cid, batch, max_len, mtp) for s in self.stages]:
            self._get(ref)
        return PipelineCache(cid, batch, max_len, cfg.num_layers_with_mtp if mtp else cfg.num_hidden_layers,
                             mtp_lengths=[0] * (cfg.num_nextn_predict_layers if mtp else 0))

    def _start(self, tokens, cache):
        b, s = tokens.shape
        start = 0
        if cache is not None:
            start = cache.length
            if cache.batch != b:
                raise InputError(f"tokens have batch {b} but the cache was made for {cache.batch}")
            if start + s > cache.max_len:
                raise InputError(f"{s} tokens at position {start} overflow the cache of "
                                 f"{cache.max_len} positions")
        if start + s > self.cfg.max_position_embeddings:
            raise InputError(f"positions up to {start + s - 1} exceed max_position_embeddings "
                             f"({self.cfg.max_position_embeddings})")
        return start

    def _submit(self, tokens, start, cache_id, trace: bool):
        """Queue one forward through every stage without waiting -> (embedding ref, h ref,
        [trace refs])."""
        h = emb = self.ex.call(self.first, "embed", tokens)
        traces = []
        for st in self.stages:
            h, tr = self.ex.call(st, "layers", h, start, cache_id, trace, returns=2)
            traces.append(tr)
        return emb, h, traces

    def hidden_states(self, tokens, cache=None, trace=None, final_norm=True):
        tokens = self.check_tokens(tokens)
        start = self._start(tokens, cache)
        emb, h_ref, tr_refs = self._submit(tokens, start,
                                           None if cache is None else cache.cache_id, trace is not None)
        if final_norm:
            h_ref = self.ex.call(self.last, "final_norm", h_ref)
        h = self._get(h_ref)
        if trace is not None:
            recorder(trace)("embed", self._get(emb))
            for ref in tr_refs:
                trace.update(self._get(ref))
            if final_norm:
                recorder(trace)("final_hidden", h)
        if cache is not None:
            cache.length = start + tokens.shape[1]
        return h

    def logits(self, h, trace=None):
        out, tr = self.ex.call(self.last, "logits", h, False, returns=2)
        out = self._get(out)
        recorder(trace)("logits", out)
        return out

    def forward(self, tokens, cache=None, trace=None, mtp=False, mtp_conventions=None):
        if mtp:
            if cache is not None:
                raise InputError("forward(mtp=True) is teacher-forced over a whole sequence and "
                                 "takes no cache; decode incrementally with generate.Drafter")
            if not self.has_mtp():
                raise InputError("forward(mtp=True): the weights hold no MTP layers (layer "
                                 f"{self.cfg.num_hidden_layers} and on)")
            conv = mtp_conventions or MTP_DEFAULT
            tokens = self.check_tokens(tokens)
            h0, h = self.main_hidden(tokens, None, trace, conv)
            return self.logits(h, trace), Model.teacher_forced(self, tokens, h0, trace, conv)
        return self.logits(self.hidden_states(tokens, cache, trace), trace)

    def forward_microbatches(self, tokens, microbatches: int) -> np.ndarray:
        """Logits of a batch split into `microbatches` parts along the batch, all queued at once:
        stage i works on part m while stage i+1 works on part m-1.  Each part's logits are
        those of forward(part)."""
        tokens = self.check_tokens(tokens)
        parts = np.array_split(tokens, microbatches, axis=0)
        refs = []
        for p in parts:
            _, h, _ = self._submit(p, 0, None, False)
            h = self.ex.call(self.last, "final_norm", h)
            refs.append(self.ex.call(self.last, "logits", h, False, returns=2)[0])
        return np.concatenate([self._get(r) for r in refs], axis=0)

    def main_hidden(self, tokens, cache=None, trace=None, conv: Conventions = MTP_DEFAULT):
        if conv.h0 == "final_norm":
            h = self.hidden_states(tokens, cache, trace)
            return h, h
        pre = self.hidden_states(tokens, cache, trace, final_norm=False)
        return pre, self._get(self.ex.call(self.last, "final_norm", pre))

    def mtp_module(self, k, tokens_k, h_prev, start=0, cache=None, trace=None,
                   conv: Conventions = MTP_DEFAULT):
        h, logits, tr = self.ex.call(self.last, "mtp_module", k, np.asarray(tokens_k),
                                     to_numpy(h_prev), start,
                                     None if cache is None else cache.cache_id, trace is not None,
                                     conv.as_dict(), returns=3)
        if trace is not None:
            trace.update(self._get(tr))
        return self._get(h), self._get(logits)

    def has_mtp(self, depths=None) -> bool:
        return bool(self._get(self.ex.call(self.last, "has_mtp", depths)))


def source_of(path_or_arrays, cfg: Config | None = None):
    """("checkpoint", path) for a directory, ("arrays", config dict, arrays) for weights in
    memory: what every stage opens itself."""
    if isinstance(path_or_arrays, dict):
        if cfg is None:
            raise RefimplError("weights in memory need their config")
        return ("arrays", cfg.to_dict(), path_or_arrays)
    return ("checkpoint", str(path_or_arrays))
