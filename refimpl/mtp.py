"""Multi-Token Prediction (paper section 2.2, eqs. 21-23; SPEC.md section 6).

Module k (k = 1..D) works on its own sequence of indices i, aligned with the main model's
positions: at index i it combines the embedding of token t_{i+k} with h^{k-1}_i, the previous
depth's hidden state at the same index, runs one full decoder layer (MLA + MoE, causal attention
over ITS OWN indices 0..i, its own latent cache) and predicts t_{i+k+1}:

    h'^k_i = W_eh [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]          eq. (21), embedding first
    h^k_{0..}  = TRM_k(h'^k_{0..})                                  eq. (22)
    P^k_i = softmax(head(shared_head.norm(h^k_i)))   -> t_{i+k+1}   eq. (23)

For tokens t_0..t_{T-1}, depth k has the T-k indices i = 0..T-k-1 (t_{i+k} must exist); the logits
at the last index predict a token beyond the sequence. h^0_i is the main model's hidden state at
position i.  Module k lives in the checkpoint at decoder layer num_hidden_layers + k - 1, and in
a latent cache (Model.new_cache(mtp=True)) at the same slot, with its own filled length
cache.mtp_lengths[k-1].

Choices the paper leaves open are named in `Conventions` and recorded wherever outputs are written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import mla, rope
from .backend import array_module, to_numpy
from .errors import InputError, RefimplError
from .norm import rms_norm
from .ops import linear


@dataclass(frozen=True)
class Conventions:
    """The undocumented choices of the MTP path, each named with its alternatives.

    concat:  order of eh_proj's input. "embedding_first" [enorm(Emb) ; hnorm(h)] is what the
             released weights need (vLLM, SGLang, Megatron-LM, transformers); "hidden_first" is
             eq. (21) as printed.
    h0:      which main hidden state feeds module 1. "final_norm" (after the main model's final
             RMSNorm, as vLLM, SGLang and transformers do) or "pre_norm" (the last decoder layer's
             output).
    chain:   which h^k feeds module k+1 (only matters for D >= 2). "head_norm" (after
             shared_head.norm, as transformers and Megatron-LM do, and the analogue of h0 =
             final_norm) or "pre_head_norm" (the decoder layer's output, as vLLM's MTP layer
             returns it).
    weights: whose embedding and output head module k uses. "main" (model.embed_tokens and
             lm_head: the paper says they are shared; transformers ties them to the main model)
             or "module" (the copies stored under the MTP layer, embed_tokens and
             shared_head.head, which is what vLLM loads).
    positions: the RoPE position of module k's index i. "index" (i, the position of h^{k-1}_i,
             as vLLM and Megatron-LM do) or "token" (i + k, the position of t_{i+k}, as
             transformers does). RoPE scores depend only on position differences, so logits agree
             to rounding; the cached k^R differ by a rotation.
    first_embedding: the embedding at module index 0, Emb(t_k). "keep" (as at every other index,
             eq. (21)) or "zero" (replaced by zeros, as vLLM and SGLang do at position 0).
    """

    concat: str = "embedding_first"
    h0: str = "final_norm"
    chain: str = "head_norm"
    weights: str = "main"
    positions: str = "index"
    first_embedding: str = "keep"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v not in CHOICES[f.name]:
                raise RefimplError(f"MTP convention {f.name}={v!r} is not one of "
                                   f"{', '.join(CHOICES[f.name])}")

    def as_dict(self) -> dict:
        """{name: choice}, for manifests and JSON reports."""
        return dataclasses.asdict(self)


CHOICES = {"concat": ("embedding_first", "hidden_first"), "h0": ("final_norm", "pre_norm"),
           "chain": ("head_norm", "pre_head_norm"), "weights": ("main", "module"),
           "positions": ("index", "token"), "first_embedding": ("keep", "zero")}
DEFAULT = Conventions()


# ---- eq. (21) ------------------------------------------------------------------------------------

def combine(emb, h_prev, enorm, hnorm, eh_proj, eps: float, concat: str = "embedding_first"):
    """eq. (21): h' = W_eh [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)] (order per `concat`).
    emb, h_prev: [b, s, d]; eh_proj: [d, 2d] -> [b, s, d]"""
    xp = array_module(emb)
    e = rms_norm(emb, enorm, eps)
    h = rms_norm(h_prev, hnorm, eps)
    parts = [e, h] if concat == "embedding_first" else [h, e]
    return linear(xp.concatenate(parts, axis=-1), eh_proj)  # [b, s, 2d] -> [b, s, d]


# ---- one module on a chunk of indices ------------------------------------------------------------

def layer_index(cfg, k: int) -> int:
    """Checkpoint (and cache slot) index of MTP module k: num_hidden_layers + k - 1."""
    return cfg.num_hidden_layers + k - 1


def depth(model) -> int:
    """D, the number of MTP modules the config declares (num_nextn_predict_layers)."""
    return model.cfg.num_nextn_predict_layers


def _record(trace, name, value):
    if trace is not None:
        trace[name] = to_numpy(value)


def embedding_name(cfg, k: int, conv: Conventions = DEFAULT) -> str:
    """The checkpoint name of the embedding table module k uses (see Conventions.weights)."""
    if conv.weights == "module":
        return f"model.layers.{layer_index(cfg, k)}.embed_tokens.weight"
    return "model.embed_tokens.weight"


def head_name(cfg, k: int, conv: Conventions = DEFAULT) -> str:
    """The checkpoint name of the output head module k uses (see Conventions.weights)."""
    if conv.weights == "module":
        return f"model.layers.{layer_index(cfg, k)}.shared_head.head.weight"
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"


def module_forward(model, k: int, tokens_k, h_prev, start: int, cache=None, trace=None,
                   conv: Conventions = DEFAULT):
    """MTP module k on the indices start .. start+s-1 of its sequence.

    tokens_k int [b, s]: tokens_k[:, j] = t_{start+j+k};  h_prev [b, s, d]: h^{k-1}_{start+j}.
    With a cache (made with mtp=True), attends over the module's cached indices 0..start-1 too and
    writes indices start.. into slot num_hidden_layers+k-1 (it does NOT move cache.mtp_lengths:
    the caller decides which indices are committed).  Without a cache start must be 0.
    -> (h^k [b, s, d] as fed to module k+1 (Conventions.chain), logits [b, s, vocab])."""
    cfg, xp, w = model.cfg, model.xp, model.weights
    L = layer_index(cfg, k)
    p = f"model.layers.{L}."
    name = f"mtp.{k}."
    b, s = tokens_k.shape
    if cache is None and start != 0:
        raise RefimplError("module_forward without a cache must start at index 0")
    idx = np.arange(start, start + s)
    pos = idx + (k if conv.positions == "token" else 0)
    if pos[-1] >= cfg.max_position_embeddings:
        raise InputError(f"MTP module {k}: position {int(pos[-1])} exceeds max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    cos, sin = rope.cos_sin(pos, model.inv_freq, model.cos_sin_factor, xp)
    mask = mla.causal_mask(idx, np.arange(start + s), xp)  # causal over the module's own indices
    # Emb(t_{i+k}): [b, s, d]; by rows and the head below streamed, as the main model does, so
    # that a budget (--max-memory) never has to hold a whole vocabulary-sized matrix
    emb = w.rows(embedding_name(cfg, k, conv), np.asarray(tokens_k))
    if conv.first_embedding == "zero" and start == 0:
        emb = emb.copy()
        emb[:, 0] = 0.0
    _record(trace, name + "embed", emb)
    _record(trace, name + "h_prev", h_prev)
    x = combine(emb, h_prev, w.get(p + "enorm.weight"), w.get(p + "hnorm.weight"),
                w.get(p + "eh_proj.weight"), cfg.rms_norm_eps, conv.concat)  # eq. (21)
    _record(trace, name + "eh_proj", x)
    h = model.decoder_layer(L, x, cos, sin, mask, start, cache, trace, prefix=name + "layer.")  # eq. (22)
    hn = rms_norm(h, w.get(p + "shared_head.norm.weight"), cfg.rms_norm_eps)
    _record(trace, name + "head_norm", hn)
    logits = w.linear(hn, head_name(cfg, k, conv))  # eq. (23), before the softmax
    _record(trace, name + "logits", logits)
    out = hn if conv.chain == "head_norm" else h
    _record(trace, name + "hidden", out)
    return out, logits


def main_hidden(model, tokens, cache=None, trace=None, conv: Conventions = DEFAULT):
    """(h^0 for module 1, the main model's final hidden state after its norm) for `tokens`.
    With conv.h0 == "pre_norm", h^0 is the last decoder layer's output."""
    if conv.h0 == "final_norm":
        h = model.hidden_states(tokens, cache, trace)
        return h, h
    pre = model.hidden_states(tokens, cache, trace, final_norm=False)
    return pre, rms_norm(pre, model.weights.get("model.norm.weight"), model.cfg.rms_norm_eps)


def teacher_forced(model, tokens, h0, trace=None, conv: Conventions = DEFAULT, depths=None) -> list:
    """Every module over a whole sequence, without a cache (training-time view).

    tokens int [b, T]; h0 [b, T, d] (main_hidden's first result).  Returns D arrays, the k-th
    [b, T-k, vocab]: logits of module k at index i, predicting t_{i+k+1} (empty when T <= k)."""
    xp = model.xp
    tokens = np.asarray(tokens)
    b, T = tokens.shape
    h = h0
    out = []
    for k in range(1, (depth(model) if depths is None else depths) + 1):
        if T - k <= 0:
            out.append(xp.zeros((b, 0, model.cfg.vocab_size), model.dtype))
            continue
        h, logits = module_forward(model, k, tokens[:, k:], h[:, :T - k], 0, None, trace, conv)
        out.append(logits)
    return out


def has_weights(model, depths=None) -> bool:
    """True when the weight source holds every tensor of MTP modules 1..depths (default D)."""
    from .checkpoint import BIAS_SUFFIX, layer_plan

    cfg = model.cfg
    n = cfg.num_nextn_predict_layers if depths is None else depths
    if n < 1:
        return False
    names = set(model.weights.source.names())
    return all(name in names for k in range(1, n + 1)
               for name in layer_plan(cfg, layer_index(cfg, k))
               if not name.endswith(BIAS_SUFFIX))  # the gate bias is optional (see Checkpoint)


# ---- incremental MTP over a growing sequence ------------------------------------------------------

class Drafter:
    """Incremental MTP through the latent cache, for decoding.

    Committed state: the tokens t_0..t_{n-1} known to be right, the main model's hidden states
    h^0 for positions 0..c_0-1 (c_0 = cache.length), and for each module k the indices
    0..c_k-1 computed from right inputs (c_k = cache.mtp_lengths[k-1]), where
    c_k = min(c_{k-1}, n - k): index i needs h^{k-1}_i and t_{i+k}.

    `extend` adds committed tokens and main hidden states and advances every module over its newly
    computable indices.  `draft(m)` proposes t_n .. t_{n+m-1} from the chain: module 1 at index
    n-2 gives the first; module k >= 2 then runs TENTATIVELY over its indices c_k .. n-2, whose
    inputs include earlier drafts; these entries are written past cache.mtp_lengths[k-1], so they
    are discarded (overwritten by the next extend) whatever the verification decides.  Rolling
    back is therefore only resetting lengths: the main model's to the accepted prefix, the modules'
    never move past committed indices.
    """

    def __init__(self, model, cache, conv: Conventions = DEFAULT, depths: int | None = None):
        D = depth(model) if depths is None else depths
        if D < 1 or D > depth(model):
            raise InputError(f"MTP depth {D} must be in 1..num_nextn_predict_layers ({depth(model)})")
        if len(cache.c_kv) < layer_index(model.cfg, D) + 1 or len(cache.mtp_lengths) < D:
            raise RefimplError("the cache has no MTP slots; make it with model.new_cache(mtp=True)")
        self.model, self.cache, self.conv, self.D = model, cache, conv, D
        self.tokens: list[int] = []
        self.h0_len = 0  # c_0 as seen by the drafter (must follow cache.length)
        xp, d = model.xp, model.cfg.hidden_size
        # pending[k]: h^k for indices c_{k+1} .. c_k - 1 (computed, not yet used by module k+1)
        self.pending = [xp.zeros((cache.batch, 0, d), model.dtype) for _ in range(D)]
        self.last_logits = [None] * D  # logits at each module's last committed index

    def committed(self, k: int) -> int:
        """c_k: indices of module k (k >= 1) computed from right inputs; c_0 is the main model's."""
        return self.h0_len if k == 0 else self.cache.mtp_lengths[k - 1]

    def extend(self, new_tokens, new_h0, trace=None) -> list:
        """Commit `new_tokens` (ids appended to the sequence) and `new_h0` [b, s, d] (the main
        model's h^0 at the next s positions) and advance every module.  Returns, per module k, the
        logits [b, s_k, vocab] at its newly committed indices (predicting t_{i+k+1})."""
        xp = self.model.xp
        self.tokens.extend(int(t) for t in new_tokens)
        self.pending[0] = xp.concatenate([self.pending[0], new_h0], axis=1)
        self.h0_len += new_h0.shape[1]
        n = len(self.tokens)
        if self.h0_len > n:
            raise RefimplError(f"{self.h0_len} main hidden states for only {n} tokens")
        seq = np.array(self.tokens, dtype=np.int64)
        out = []
        for k in range(1, self.D + 1):
            start = self.committed(k)
            stop = max(start, min(self.committed(k - 1), n - k))
            s = stop - start
            if s == 0:
                out.append(xp.zeros((self.cache.batch, 0, self.model.cfg.vocab_size), self.model.dtype))
                continue
            idx = np.arange(start, stop)
            h, logits = module_forward(self.model, k, seq[idx + k][None, :],
                                       self.pending[k - 1][:, :s], start, self.cache, trace, self.conv)
            self.pending[k - 1] = self.pending[k - 1][:, s:]
            if k < self.D:
                self.pending[k] = xp.concatenate([self.pending[k], h], axis=1)
            self.cache.mtp_lengths[k - 1] = stop
            self.last_logits[k - 1] = logits[:, -1]
            out.append(logits)
        return out

    def draft(self, m: int, choose=None) -> tuple[list[int], list]:
        """Propose the next m tokens t_n .. t_{n+m-1} (m <= D) with the MTP chain.

        choose(logits [vocab]) -> id picks each draft (default: argmax, ties to the lower id).
        Needs every module caught up: c_0 = n - 1 (the last token is the main model's newest,
        not yet run by it).  Returns (drafts, the logits each was chosen from)."""
        if m < 0 or m > self.D:
            raise InputError(f"cannot draft {m} tokens with {self.D} MTP modules")
        if m == 0:
            return [], []
        choose = choose or (lambda v: int(np.argmax(to_numpy(v))))
        n = len(self.tokens)
        if self.h0_len != n - 1 or self.committed(1) != n - 1:
            raise RefimplError("draft needs the main model one token behind the sequence and the "
                               "modules caught up (call extend first)")
        xp = self.model.xp
        ext = list(self.tokens)
        logits1 = self.last_logits[0][0]
        drafts, dlogits = [choose(logits1)], [logits1]
        ext.append(drafts[0])
        h_tent = xp.zeros((1, 0, self.model.cfg.hidden_size), self.model.dtype)  # tentative h^1
        for k in range(2, m + 1):
            start, stop = self.committed(k), n - 1
            idx = np.arange(start, stop)
            # h^{k-1} at start..stop-1: committed pending ones, then the tentative ones
            h_prev = xp.concatenate([self.pending[k - 1], h_tent], axis=1)
            assert h_prev.shape[1] == stop - start, (h_prev.shape, start, stop)
            toks = np.array(ext, dtype=np.int64)[idx + k][None, :]
            h_tent, logits = module_forward(self.model, k, toks, h_prev, start, self.cache, None,
                                            self.conv)
            drafts.append(choose(logits[0, -1]))
            dlogits.append(logits[0, -1])
            ext.append(drafts[-1])
        return drafts, dlogits
