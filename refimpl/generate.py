"""Greedy decoding through the latent cache (speculative MTP decoding joins it in the MTP work)."""

from __future__ import annotations

import numpy as np

from .backend import to_numpy
from .errors import InputError


def greedy(model, prompt, max_new_tokens: int) -> list[int]:
    """Prefill the prompt, then append argmax tokens one decode step at a time; ties in the
    argmax go to the lower token id.  prompt: sequence of ids -> the new ids."""
    prompt = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
    if max_new_tokens < 0:
        raise InputError(f"max-new-tokens must be >= 0, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_position_embeddings:
        raise InputError(f"prompt of {prompt.shape[1]} plus {max_new_tokens} new tokens exceeds "
                         f"max_position_embeddings ({model.cfg.max_position_embeddings})")
    if max_new_tokens == 0:
        model.check_tokens(prompt)
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
