"""Decoding: greedy through the latent cache, sampled, and speculative with the MTP modules
(`decode`, paper section 5.4.3), whose incremental state machine is `Drafter`.  The equations
are elsewhere (model.py, mtp.py); this is the bookkeeping of caches, drafts and verification."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import mtp, names
from .backend import array_module, to_numpy
from .errors import InputError, RefimplError
from .ops import softmax


def argmax_id(logits) -> int:
    """The id of the largest logit, ties to the lower id, found where the logits are: on a
    device only the id crosses to the host, not the vocabulary's logits.   [vocab] -> int"""
    return int(to_numpy(array_module(logits).argmax(logits)))


def greedy(model, prompt, max_new_tokens: int) -> list[int]:
    """Prefill the prompt, then append argmax tokens one decode step at a time; ties in the
    argmax go to the lower token id.  prompt: sequence of ids -> the new ids."""
    prompt, total = _check_lengths(model, prompt, max_new_tokens)
    if max_new_tokens == 0:
        return []
    cache = model.new_cache(batch=1, max_len=total)
    logits = model.forward(prompt, cache=cache)
    out = []
    for _ in range(max_new_tokens):
        nxt = argmax_id(logits[0, -1])
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = model.forward(np.array([[nxt]]), cache=cache)
    return out


# ---- speculative decoding with the MTP modules (paper section 5.4.3; spec section 6) ---------

@dataclass
class Report:
    """What a decoding run did.  forward_passes counts MAIN-model forwards (the prefill and each
    verification); acceptance[k-1] = accepted / drafted at depth k, where a depth-k draft counts
    as accepted only when the drafts before it in the same round were (verification stops at the
    first mismatch).  tokens_per_forward counts the DECODING forwards, after the prefill (which
    yields the first token alone, with or without MTP): (len(tokens) - 1) / (forward_passes - 1);
    1 for plain decoding, D + 1 when every draft is accepted."""

    prompt: list
    tokens: list
    forward_passes: int
    depth: int = 0
    drafted: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    mtp_conventions: dict = field(default_factory=dict)
    temperature: float = 0.0
    seed: int | None = None

    @property
    def acceptance(self) -> list:
        return [a / d if d else None for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_forward(self) -> float:
        return (len(self.tokens) - 1) / (self.forward_passes - 1) if self.forward_passes > 1 else 1.0

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "tokens": self.tokens, "tokens_generated": len(self.tokens),
                "forward_passes": self.forward_passes,
                "tokens_per_forward": self.tokens_per_forward, "mtp_depth": self.depth,
                "drafted_per_depth": self.drafted, "accepted_per_depth": self.accepted,
                "acceptance_per_depth": self.acceptance, "temperature": self.temperature,
                "seed": self.seed, "mtp_conventions": self.mtp_conventions}


def _check_lengths(model, prompt, max_new_tokens):
    prompt = to_numpy(prompt).astype(np.int64).reshape(1, -1)
    if max_new_tokens < 0:
        raise InputError(f"max-new-tokens must be >= 0, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_position_embeddings:
        raise InputError(f"prompt of {prompt.shape[1]} plus {max_new_tokens} new tokens exceeds "
                         f"max_position_embeddings ({model.cfg.max_position_embeddings})")
    model.check_tokens(prompt)
    return prompt, total


def probabilities(logits, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float64 on the host.   [vocab] -> [vocab]"""
    return softmax(to_numpy(logits).astype(np.float64) / temperature)


def accept_or_resample(p, q, draft: int, rng) -> tuple[bool, int]:
    """The standard speculative-sampling rule: a draft d ~ q is kept with probability
    min(1, p(d)/q(d)); otherwise a token is drawn from the residual max(0, p - q) normalised.
    The result is distributed exactly as p.  -> (accepted, token)"""
    if rng.random() < min(1.0, p[draft] / q[draft]):
        return True, int(draft)
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    r = p if total <= 0 else r / total
    return False, int(rng.choice(len(p), p=r))


def verify(drafts, draft_logits, logits, temperature: float, rng) -> list[int]:
    """One verification: logits [1 + m, vocab] are the main model's at the newest token and the
    m drafts.  Greedy: keep drafts while d_j == argmax(logits[j]); sampling: keep d_j with
    probability min(1, p/q) (accept_or_resample).  Then append the main model's own token (its
    argmax / residual draw at the first rejection, or its choice after the last draft).
    -> the accepted drafts followed by that token (1 .. m + 1 ids)."""
    new = []
    for j, d in enumerate(drafts):
        if temperature == 0:
            choice = argmax_id(logits[j])
            ok, tok = d == choice, choice
        else:
            ok, tok = accept_or_resample(probabilities(logits[j], temperature),
                                         probabilities(draft_logits[j], temperature), d, rng)
        new.append(tok)
        if not ok:
            return new
    last = logits[len(drafts)]
    new.append(argmax_id(last) if temperature == 0 else
               int(rng.choice(last.shape[-1], p=probabilities(last, temperature))))
    return new


def decode(model, prompt, max_new_tokens: int, use_mtp: bool = False, depth: int | None = None,
           temperature: float = 0.0, seed: int | None = None, conventions=None,
           cache=None) -> Report:
    """Greedy (temperature 0, argmax with ties to the lower id) or sampled decoding, plain or
    speculative with the MTP modules.

    Speculative round: the main model's newest token t (not yet run by it) and up to D drafts
    from the MTP chain go through the main model in ONE forward; drafts are kept while each equals
    the main model's choice at the position before it (greedy) or passes min(1, p/q) (sampling);
    the main model's own token at the first rejection (or after the last draft) is appended, so
    every round adds at least one token and greedy output equals plain greedy decoding exactly.
    The main cache is rolled back to the accepted prefix (cache.length), the MTP modules' caches
    never commit draft-dependent entries (Drafter).  Pass `cache` (made with mtp=True and
    max_len >= prompt + max_new_tokens) to inspect it afterwards."""
    prompt, total = _check_lengths(model, prompt, max_new_tokens)
    conv = conventions or mtp.DEFAULT
    D = 0
    if use_mtp:
        n = model.cfg.num_nextn_predict_layers
        D = n if depth is None else depth
        if depth is not None and not 1 <= depth <= n:
            raise InputError(f"MTP depth {depth} must be in 1..num_nextn_predict_layers ({n})")
        if D < 1 or not model.has_mtp(D):
            raise InputError(f"MTP decoding (--mtp) needs MTP layers, but the weights have none "
                             f"(num_nextn_predict_layers {model.cfg.num_nextn_predict_layers}, "
                             f"no complete layer {model.cfg.num_hidden_layers})")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    rng = np.random.default_rng(seed)
    pick = argmax_id if temperature == 0 else \
        (lambda v: int(rng.choice(v.shape[-1], p=probabilities(v, temperature))))
    rep = Report(prompt=prompt[0].tolist(), tokens=[], forward_passes=0, depth=D,
                 drafted=[0] * D, accepted=[0] * D,
                 mtp_conventions=conv.as_dict() if D else {}, temperature=temperature, seed=seed)
    if max_new_tokens == 0:
        return rep
    cache = cache or model.new_cache(batch=1, max_len=total, mtp=D > 0)
    h0, h = model.main_hidden(prompt, cache, None, conv) if D else \
        (None, model.hidden_states(prompt, cache))
    logits = model.logits(h[:, -1:])
    rep.forward_passes = 1
    out = [pick(logits[0, -1])]
    drafter = None
    if D:
        drafter = Drafter(model, cache, conv, D)
        drafter.extend(prompt[0].tolist() + out, h0)
    while len(out) < max_new_tokens:
        m = min(D, max_new_tokens - len(out) - 1)
        drafts, dlogits = drafter.draft(m, pick) if m else ([], [])
        start = cache.length
        x = np.array([[out[-1], *drafts]], dtype=np.int64)  # [1, 1 + m]
        h0, h = model.main_hidden(x, cache, None, conv) if D else \
            (None, model.hidden_states(x, cache))
        logits = model.logits(h)[0]  # [1 + m, vocab]
        rep.forward_passes += 1
        new = verify(drafts, dlogits, logits, temperature, rng)
        for j in range(len(drafts)):
            rep.drafted[j] += 1
            rep.accepted[j] += int(j < len(new) - 1)  # depth j+1 kept only if all before were
        a = len(new) - 1  # accepted drafts; `new` ends with the main model's own token
        cache.length = start + a + 1  # roll back past the rejected drafts
        out.extend(new)
        if drafter is not None:
            drafter.extend(new, h0[:, :a + 1])
    rep.tokens = out[:max_new_tokens]
    return rep


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

    def __init__(self, model, cache, conv: mtp.Conventions = mtp.DEFAULT, depths: int | None = None):
        n = model.cfg.num_nextn_predict_layers
        D = n if depths is None else depths
        if D < 1 or D > n:
            raise InputError(f"MTP depth {D} must be in 1..num_nextn_predict_layers ({n})")
        if len(cache.c_kv) < names.mtp_layer(model.cfg, D) + 1 or len(cache.mtp_lengths) < D:
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
            h, logits = self.model.mtp_module(k, seq[idx + k][None, :], self.pending[k - 1][:, :s],
                                              start, self.cache, trace, self.conv)
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
        choose = choose or argmax_id
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
            h_tent, logits = self.model.mtp_module(k, toks, h_prev, start, self.cache, None,
                                                   self.conv)
            drafts.append(choose(logits[0, -1]))
            dlogits.append(logits[0, -1])
            ext.append(drafts[-1])
        return drafts, dlogits
