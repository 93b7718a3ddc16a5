"""Greedy decoding through the latent cache, and sampled / MTP speculative decoding (`decode`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import to_numpy
from .errors import InputError


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
        nxt = int(np.argmax(to_numpy(logits[0, -1])))
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = model.forward(np.array([[nxt]]), cache=cache)
    return out


# ---- speculative decoding with the MTP modules (paper section 5.4.3; SPEC.md section 6) ---------

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
    prompt = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
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
    z = to_numpy(logits).astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


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
            choice = int(np.argmax(to_numpy(logits[j])))
            ok, tok = d == choice, choice
        else:
            ok, tok = accept_or_resample(probabilities(logits[j], temperature),
                                         probabilities(draft_logits[j], temperature), d, rng)
        new.append(tok)
        if not ok:
            return new
    last = logits[len(drafts)]
    new.append(int(np.argmax(to_numpy(last))) if temperature == 0 else
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
    never commit draft-dependent entries (mtp.Drafter).  Pass `cache` (made with mtp=True and
    max_len >= prompt + max_new_tokens) to inspect it afterwards."""
    from . import mtp

    prompt, total = _check_lengths(model, prompt, max_new_tokens)
    conv = conventions or mtp.DEFAULT
    D = 0
    if use_mtp:
        D = mtp.depth(model) if depth is None else depth
        if depth is not None and not 1 <= depth <= mtp.depth(model):
            raise InputError(f"MTP depth {depth} must be in 1..num_nextn_predict_layers "
                             f"({mtp.depth(model)})")
        if D < 1 or not mtp.has_weights(model, D):
            raise InputError(f"MTP decoding (--mtp) needs MTP layers, but the weights have none "
                             f"(num_nextn_predict_layers {model.cfg.num_nextn_predict_layers}, "
                             f"no complete layer {model.cfg.num_hidden_layers})")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    rng = np.random.default_rng(seed)
    pick = (lambda v: int(np.argmax(to_numpy(v)))) if temperature == 0 else \
        (lambda v: int(rng.choice(v.shape[-1], p=probabilities(v, temperature))))
    rep = Report(prompt=prompt[0].tolist(), tokens=[], forward_passes=0, depth=D,
                 drafted=[0] * D, accepted=[0] * D,
                 mtp_conventions=conv.as_dict() if D else {}, temperature=temperature, seed=seed)
    if max_new_tokens == 0:
        return rep
    cache = cache or model.new_cache(batch=1, max_len=total, mtp=D > 0)
    h0, h = mtp.main_hidden(model, prompt, cache, None, conv) if D else \
        (None, model.hidden_states(prompt, cache))
    logits = model.logits(h[:, -1:])
    rep.forward_passes = 1
    out = [pick(logits[0, -1])]
    drafter = None
    if D:
        drafter = mtp.Drafter(model, cache, conv, D)
        drafter.extend(prompt[0].tolist() + out, h0)
    while len(out) < max_new_tokens:
        m = min(D, max_new_tokens - len(out) - 1)
        drafts, dlogits = drafter.draft(m, pick) if m else ([], [])
        start = cache.length
        x = np.array([[out[-1], *drafts]], dtype=np.int64)  # [1, 1 + m]
        h0, h = mtp.main_hidden(model, x, cache, None, conv) if D else \
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
