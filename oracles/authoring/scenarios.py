"""Serving scenarios: cases whose inputs say HOW an engine must run the requests, and whose
expected outputs are what each request gives ALONE (spec section 10).

A single whole-sequence prefill never takes the paths where serving engines broke: chunked
prefill (attention over cached context plus a new chunk, merged by log-sum-exp), prefix caching
(a second request reusing cache entries another request computed), ragged batches (requests of
different lengths, prefill and decode mixed in one forward), long decodes (past the first KV
block of ~256 tokens and past original_max_position_embeddings), and speculative decoding with
MTP drafts at depth >= 2. Each scenario case makes the engine take one of them.

Two kinds: `schedule` (teacher-forced requests run through a serving schedule) and
`mtp_speculation` (greedy speculative decoding with the MTP modules), declared at the bottom of
this file with their inputs and outputs; the schedule's format is SCHEDULE_DOC below and
oracles.format.schedule.plan checks it. docs/conformance.md section 9 shows both, generated from these declarations
(`python -m oracles.authoring.doc_tables --write docs/conformance.md`).

refimpl runs each schedule through its own latent cache (`run_schedule`: one packed cache of
batch 1 whose slots are handed to requests by a block table, a shared prefix being the same
slots; `run_speculation`: refimpl.generate.Drafter), and tests/oracles/test_scenarios.py proves the
result equals the standalone one (`alone_*`) to 1e-12 in float64. The expected values are the
standalone ones.
"""

from __future__ import annotations

import numpy as np

from refimpl import generate, layer, mtp, names, rope
from refimpl.backend import to_numpy
from refimpl.layer import AttentionContext
from refimpl.norm import rms_norm
from refimpl.trace import recorder

from .. import OraclesError
from ..format.schema import Case
from .draws import case_rng, designed, model_weights, mtp_weights
from ..format.schedule import (SCHEDULE_FORMAT, Forward, Preempt, Share, _int, expand,  # noqa: F401
                               plan, prompt_lengths, request_name, request_tokens, shared_lengths)
from .kinds import case_model, greedy_aux, kind, model_aux

SCHEDULE_KINDS = ("schedule", "mtp_speculation")

# The schedule format, written once (Markdown; docs/conformance.md section 9 is generated from it).
SCHEDULE_DOC = """\
The schedule is JSON, in the manifest (`params.schedule`), in `inputs.safetensors`'s metadata
(`params`), and on the Python route as `case.schedule`:

```
{"format": 1, "requests": 2, "prompt_lengths": [25, 30], "steps": [
  {"op": "forward", "batch": [[0, 20]]},
  {"op": "share_prefix", "request": 1, "from": 0, "length": 20},
  {"op": "forward", "batch": [[0, 5], [1, 7]]},
  {"op": "forward", "batch": [[1, 3]]},
  {"op": "forward", "batch": [[1, 1]], "repeat": 3},
  {"op": "preempt", "request": 1},
  {"op": "forward", "batch": [[1, 1]]}]}
```

- `forward`: ONE engine forward (one batch) holding, for each `[r, n]`, the next n tokens of
  request r at its next positions; they attend to request r's cache and causally to each other,
  never to another request. `repeat: k` is the same step k times (a decode loop).
- `share_prefix`: request r (empty) starts from the first `length` cache entries request `from`
  computed: prefix caching, computed once, not recomputed for r. Their first `length` tokens are
  equal. Request r's outputs start at position `length`.
- `preempt`: request r's cache entries are freed, as an engine frees them when its KV cache
  runs out; its next forward recomputes every token it holds (positions 0..h-1, in that same
  forward, before its n next tokens: the recompute policy). The outputs at the recomputed
  positions are not reported again: request r's outputs are each position's first computation.
- `prompt_lengths` (optional): request r's first P_r tokens are its prompt, the rest are decode
  tokens, which an engine that samples produces one per forward. So a prefill chunk holds prompt
  tokens only, a decode step of a request holds exactly one token, and a shared prefix lies
  inside the receiving request's prompt. This is what tells a one-token prefill chunk (the
  prompt's last token, with a context: no token was sampled before it) from a decode step. A
  schedule without it (suites written before it was added) marks every token as prompt.
- Each request ends holding all of its tokens. `oracles.format.schedule.plan(schedule, lengths)`
  checks a schedule (one line naming the step when it is malformed or breaks a rule above) and
  unrolls it into typed steps (`Forward` of `Chunk`s with the request, first position, token
  count, recomputed count and prompt flag; `Share`; `Preempt`), which the built-in adapters
  walk; `expand` gives the same as tuples. The reading side runs it on every schedule case of a
  suite and checks each request's outputs against the positions it computes (section 8).
  `prompt_lengths` and `preempt` are additive: format-1 suites written before them read as
  before; a reader older than them refuses `preempt` with one line.
- `mtp_speculation`'s schedule is one step, `{"op": "speculate", "depth": D, "max_new_tokens":
  N}`: greedy speculative decoding with D MTP drafts per round, the newest token and the drafts
  verified in one main-model forward, drafts kept while they equal the main model's argmax.
"""


# ---------------------------------------------------------------------------------------------
# refimpl through a schedule: one packed latent cache and a block table
# ---------------------------------------------------------------------------------------------

class PackedRun:
    """The requests of a schedule in one latent cache of batch 1, as a paged serving engine
    holds them: each forward appends its tokens' latents at the next free slots, and
    slots[r] (request r's block table) lists the slot of each of its positions. Sharing a prefix
    copies block-table entries, not latents. A query of request r at position p attends to
    slots[r][0..p] only (its mask), at RoPE position p."""

    def __init__(self, model, tokens: list[np.ndarray], max_len: int | None = None):
        self.model, self.tokens = model, tokens
        self.cache = model.new_cache(batch=1, max_len=max_len or sum(len(t) for t in tokens))
        self.slots = [np.zeros(0, np.int64) for _ in tokens]
        self.held = [0] * len(tokens)  # tokens each request holds (its cache may have been freed)
        self.traces = [[] for _ in tokens]  # per request, the trace of each of its forwards

    def share(self, r: int, q: int, length: int) -> None:
        if not np.array_equal(self.tokens[r][:length], self.tokens[q][:length]):
            raise OraclesError(f"share_prefix: requests {r} and {q} differ in their first {length} tokens")
        self.slots[r] = self.slots[q][:length].copy()
        self.held[r] = length

    def preempt(self, r: int) -> None:
        """Request r's cache entries are freed (its slots are not reused: the cache only grows);
        its next forward recomputes every token it holds."""
        self.slots[r] = np.zeros(0, np.int64)

    def forward(self, batch) -> None:
        """One forward over the packed new tokens of every [r, n] in the batch (a preempted
        request's held tokens recomputed first, in the same forward; only its n new tokens'
        outputs are kept)."""
        model, cfg = self.model, self.model.cfg
        start = self.cache.length
        ids, pos, seg, keep = [], [], [], []
        for r, n in batch:
            first = len(self.slots[r])  # 0 after a preemption: everything is recomputed
            last = self.held[r] + n
            ids.append(self.tokens[r][first:last])
            pos.append(np.arange(first, last))
            seg.append((r, last - first))
            keep.append(n)
            self.held[r] = last
        ids, pos = np.concatenate(ids)[None, :], np.concatenate(pos)
        s = ids.shape[1]
        if start + s > self.cache.max_len:
            raise OraclesError(f"the schedule needs more than the {self.cache.max_len} cache slots given")
        new_slots = np.arange(start, start + s)
        tables, row = [], 0
        for r, n in seg:
            tables.append(np.concatenate([self.slots[r], new_slots[row:row + n]]))
            row += n
        mask = batch_mask([(n, len(self.slots[r]), t) for (r, n), t in zip(seg, tables)], start + s)
        for (r, _), t in zip(seg, tables):
            self.slots[r] = t
        trace = {}
        xp = model.xp
        cos, sin = rope.cos_sin(pos, model.inv_freq, model.cos_sin_factor, xp, model.dtype)
        form = model.mla_form if model.mla_form != "auto" else ("absorbed" if start > 0 else "naive")
        context = AttentionContext(cos, sin, xp.asarray(mask), start, model.softmax_scale, form,
                                   self.cache)
        h = model.weights.rows(names.EMBED, ids)  # [1, s] -> [1, s, d]
        recorder(trace)("embed", h)
        for i in range(cfg.num_hidden_layers):
            h = layer.decoder_layer(h, model.weights, cfg, i, context, recorder(trace, f"layers.{i}."))
        self.cache.length = start + s
        h = rms_norm(h, model.weights.get(names.FINAL_NORM), cfg.rms_norm_eps)
        recorder(trace)("final_hidden", h)
        model.logits(h, trace)
        row = 0
        for (r, n), k in zip(seg, keep):
            self.traces[r].append({name: v[:, row + n - k:row + n] for name, v in trace.items()})
            row += n

    def outputs(self) -> dict:
        out = {}
        for r, parts in enumerate(self.traces):
            for name in parts[0]:
                out[request_name(r, name)] = np.concatenate([p[name] for p in parts], axis=1)
        return out


def batch_mask(segments, n_slots: int) -> np.ndarray:
    """The attention mask of one packed forward.  segments: per request in the batch, in row
    order, (n new tokens, tokens held before, its block table after: slot of each position).
    Row j (the request's token at position p) sees the slots of its own positions 0..p.
    -> bool [sum n, n_slots]"""
    mask = np.zeros((sum(n for n, _, _ in segments), n_slots), dtype=bool)  # [queries, slots]
    row = 0
    for n, held, table in segments:
        q_pos = np.arange(held, held + n)
        mask[np.arange(row, row + n)[:, None], table[None, :]] = \
            np.arange(len(table))[None, :] <= q_pos[:, None]
        row += n
    return mask


def run_schedule(case, dtype) -> dict:
    """The `schedule` kind through refimpl: every step of params.schedule on one PackedRun."""
    tokens = request_tokens(case)
    steps = plan(case.params.get("schedule"), [len(t) for t in tokens])
    slots = sum(c.recompute + c.n for st in steps if isinstance(st, Forward) for c in st.chunks)
    run = PackedRun(case_model(case, dtype), tokens, max_len=slots)
    for st in steps:
        if isinstance(st, Share):
            run.share(st.request, st.donor, st.length)
        elif isinstance(st, Preempt):
            run.preempt(st.request)
        else:
            run.forward([(c.request, c.n) for c in st.chunks])
    return run.outputs()


def alone_schedule(case, dtype) -> dict:
    """What each request gives alone: one whole-sequence forward per request, cut to the
    positions the schedule computes for it."""
    tokens = request_tokens(case)
    model = case_model(case, dtype)
    start = shared_lengths(case.params["schedule"], len(tokens))
    out = {}
    for r, t in enumerate(tokens):
        trace = {}
        model.forward(t[None, :], trace=trace)
        out.update({request_name(r, k): v[:, start[r]:] for k, v in trace.items()})
    return out


def schedule_required(case):
    return [request_name(r, "logits") for r in range(len(request_tokens(case)))]


def schedule_aux(case, out):
    """request.<r>.layers.N.topk_margin for every MoE layer of every request."""
    aux = {}
    for r in range(len(request_tokens(case))):
        p = request_name(r, "")
        mine = {k[len(p):]: v for k, v in out.items() if k.startswith(p)}
        aux.update({p + k: v for k, v in model_aux(case, mine).items()})
    return aux


# ---------------------------------------------------------------------------------------------
# Speculative decoding with the MTP modules
# ---------------------------------------------------------------------------------------------

def _speculation_params(case) -> tuple[int, int]:
    p = case.params
    n, d = p.get("max_new_tokens"), p.get("depth")
    _int(n, "params.max_new_tokens", 1)
    _int(d, "params.depth", 1)
    if d > case.config.num_nextn_predict_layers:
        raise OraclesError(f"case {case.id}: params.depth {d} exceeds the model's "
                           f"{case.config.num_nextn_predict_layers} MTP module(s)")
    return n, d


def _concat(parts: list[dict]) -> dict:
    """Traces of consecutive chunks -> one trace, concatenated on the sequence axis."""
    names = list(dict.fromkeys(k for p in parts for k in p))
    return {k: np.concatenate([p[k] for p in parts if k in p], axis=1) for k in names}


def run_speculation(case, dtype) -> dict:
    """Greedy speculative decoding through refimpl's latent cache and generate.Drafter: each round,
    the newest token and up to D drafts go through the main model in one forward, drafts are
    kept while they equal its argmax, the cache rolls back past the rejected ones. Kept: the
    main trace at committed positions and each module's trace at its committed indices."""
    n_new, depth = _speculation_params(case)
    model = case_model(case, dtype)
    prompt = np.asarray(case.inputs["input_ids"], np.int64)
    conv = mtp.DEFAULT
    cache = model.new_cache(batch=1, max_len=prompt.shape[1] + n_new, mtp=True)
    main, modules = [{}], []
    h0, h = model.main_hidden(prompt, cache, main[0], conv)
    logits = to_numpy(model.logits(h, main[0]))
    out = [int(np.argmax(logits[0, -1]))]
    drafter = generate.Drafter(model, cache, conv, depth)
    modules.append({})
    drafter.extend(prompt[0].tolist() + out, h0, modules[-1])
    while len(out) < n_new:
        m = min(depth, n_new - len(out) - 1)
        drafts, _ = drafter.draft(m) if m else ([], [])
        start = cache.length
        tr = {}
        h0, h = model.main_hidden(np.array([[out[-1], *drafts]], np.int64), cache, tr, conv)
        logits = to_numpy(model.logits(h, tr))  # [1, 1 + m, vocab]
        new = generate.verify(drafts, None, logits[0], 0.0, None)
        a = len(new) - 1  # accepted drafts
        cache.length = start + a + 1  # roll back past the rejected drafts
        main.append({k: v[:, :a + 1] for k, v in tr.items()})
        out.extend(new)
        modules.append({})
        drafter.extend(new, h0[:, :a + 1], modules[-1])
    return {"tokens": np.array([out[:n_new]], np.int64), **_concat(main), **_concat(modules)}


def alone_speculation(case, dtype) -> dict:
    """Plain greedy decoding, then one teacher-forced pass over the prompt and the N tokens:
    the main trace at positions 0..P+N-2, module k's at indices 0..P+N-k-1."""
    n_new, depth = _speculation_params(case)
    model = case_model(case, dtype)
    prompt = np.asarray(case.inputs["input_ids"], np.int64)
    toks = generate.greedy(model, prompt[0], n_new)
    seq = np.concatenate([prompt, np.array([toks], np.int64)], axis=1)
    trace = {}
    model.forward(seq, trace=trace, mtp=True, mtp_conventions=mtp.DEFAULT)
    main = {k: v[:, :-1] for k, v in trace.items() if not k.startswith("mtp.")}
    modules = {k: v for k, v in trace.items() if k.startswith("mtp.") and int(k.split(".")[1]) <= depth}
    return {"tokens": np.array([toks], np.int64), **main, **modules}


# ---------------------------------------------------------------------------------------------
# Builders and suites
# ---------------------------------------------------------------------------------------------

def schedule_case(cid, cfg, lengths, steps, pins, share=None, prompts=None):
    """Requests of the given lengths with random tokens (request r copies request q's first L
    tokens for each (r, q, L) in `share`), run by `steps`; request r's first prompts[r] tokens
    are its prompt (default: every token)."""
    rng = case_rng(cid)
    w = model_weights(cfg, rng)
    toks = [rng.integers(0, cfg.vocab_size, n).astype(np.int64) for n in lengths]
    for r, q, length in share or ():
        toks[r][:length] = toks[q][:length]
    schedule = {"format": SCHEDULE_FORMAT, "requests": len(lengths), "steps": steps}
    if prompts is not None:
        schedule["prompt_lengths"] = list(prompts)
    plan(schedule, lengths)  # a builder's schedule is checked like a suite's
    inputs = {f"request.{r}.input_ids": t[None, :] for r, t in enumerate(toks)}
    return designed(Case(cid, "schedule", pins, inputs, params={"schedule": schedule}, config=cfg,
                         weights=w))


def forward_step(*pairs, repeat=1):
    """A `forward` step of a schedule: one engine forward holding [request, tokens] pairs,
    `repeat` times."""
    st = {"op": "forward", "batch": [list(p) for p in pairs]}
    if repeat != 1:
        st["repeat"] = repeat
    return st


def _chunks(n, size):
    """n tokens in chunks of at most `size`."""
    return [min(size, n - i) for i in range(0, n, size)]


def chunked_prefill_case(cid, cfg, chunks, decode=0, pins=None):
    """One request's prompt prefilled in the given chunk sizes, then `decode` decode steps."""
    steps = [forward_step((0, c)) for c in chunks] + ([forward_step((0, 1), repeat=decode)] if decode else [])
    return schedule_case(cid, cfg, [sum(chunks) + decode], steps,
                         pins or f"prefill in chunks of {', '.join(map(str, chunks))} tokens",
                         prompts=[sum(chunks)])


def prefix_cache_case(cid, cfg, prefix, first, second, extend, pins=None):
    """Request 0 computes a shared prefix (and `first` more tokens); request 1 reuses the
    prefix's cache entries, adds `second` tokens in the same forward as request 0's, then is
    extended by `extend` tokens alone, the last three as decode steps."""
    steps = [forward_step((0, prefix)),
             {"op": "share_prefix", "request": 1, "from": 0, "length": prefix},
             forward_step((0, first), (1, second))]
    steps += [forward_step((1, extend - 3)), forward_step((1, 1), repeat=3)] if extend > 3 else [forward_step((1, 1), repeat=extend)]
    decode = min(extend, 3)
    return schedule_case(cid, cfg, [prefix + first, prefix + second + extend], steps,
                         pins or f"a {prefix}-token prefix computed once and reused by a second "
                                  "request, then extended", share=[(1, 0, prefix)],
                         prompts=[prefix + first, prefix + second + extend - decode])


def prefix_blocks_case(cid, cfg, lengths, tail=1, decode=3, pins=None):
    """Request 0 computes a prompt longer than every shared length; request r (1, 2, ...) reuses
    its first lengths[r-1] cache entries, prefills `tail` more prompt tokens (all of them in ONE
    forward, mixed) and decodes `decode` tokens. Lengths at block multiples (16, 64, 256) take a
    paged cache's full-block hit; one off takes a partial block. Each receiver's outputs are
    tail + decode positions: with 4 of them the norm metric of a bf16 engine's attention output
    varies by more than the bf16 floor from position to position (MLX: 0.0063 over 4 of the
    donor's own positions, 0.0040 over 12), so the scenarios suite decodes 15."""
    donor = max(lengths) + 8
    n = len(lengths)
    steps = [forward_step((0, c)) for c in _chunks(donor, 128)]
    steps += [{"op": "share_prefix", "request": r + 1, "from": 0, "length": L}
              for r, L in enumerate(lengths)]
    steps += [forward_step((0, 1), *[(r + 1, tail) for r in range(n)]),
              forward_step(*[(r, 1) for r in range(n + 1)], repeat=decode)]
    return schedule_case(
        cid, cfg, [donor + decode + 1] + [L + tail + decode for L in lengths], steps,
        pins or "shared prefixes of " + ", ".join(map(str, lengths)) + " tokens (requests "
        + ", ".join(str(r + 1) for r in range(n)) + "), each extended in one mixed forward",
        share=[(r + 1, 0, L) for r, L in enumerate(lengths)],
        prompts=[donor] + [L + tail for L in lengths])


def ragged_batch_case(cid, cfg, prompts, decode, pins=None):
    """Requests with different prompt lengths prefilled in ONE forward, then decoded together
    (every forward a batch of one token per request); the shortest request then joins late:
    its prefill shares a forward with the others' decode steps (a mixed batch)."""
    n = len(prompts)
    late = n - 1  # the last request arrives after the first decode steps
    steps = [forward_step(*[(r, prompts[r]) for r in range(n) if r != late]),
             forward_step(*[(r, 1) for r in range(n) if r != late], repeat=2),
             forward_step(*[(r, 1) for r in range(n) if r != late], (late, prompts[late])),
             forward_step(*[(r, 1) for r in range(n)], repeat=decode)]
    lengths = [prompts[r] + (decode + 3 if r != late else decode) for r in range(n)]
    first = " and ".join(str(prompts[r]) for r in range(n) if r != late)
    return schedule_case(cid, cfg, lengths, steps, pins or
                         f"prompts of {first} tokens in one forward, then a {prompts[late]}-token "
                         "prefill in the same forward as their decode steps", prompts=prompts)


def mixed_step_case(cid, cfg, pins=None):
    """Prefill chunks and decode steps of four requests in the same forwards: requests 0 and 1
    decode while request 2's 30-token prompt arrives in chunks of 10, 15 and 5 (first, middle,
    last) and request 3's 8-token prompt in chunks of 7 and a final one-token chunk, which then
    decodes beside them."""
    steps = [forward_step((0, 12), (1, 20)),
             forward_step((0, 1), (1, 1), repeat=2),
             forward_step((0, 1), (1, 1), (2, 10), (3, 7)),
             forward_step((0, 1), (1, 1), (2, 15), (3, 1)),
             forward_step((0, 1), (1, 1), (2, 5), (3, 1)),
             forward_step((0, 1), (1, 1), (2, 1), (3, 1), repeat=3)]
    return schedule_case(cid, cfg, [12 + 8, 20 + 8, 30 + 3, 8 + 4], steps, pins or
                         "one forward holding decode steps of two requests, a middle prefill "
                         "chunk of a third and the final one-token prefill chunk of a fourth",
                         prompts=[12, 20, 30, 8])


def final_chunk_case(cid, cfg, chunks, decode, pins=None):
    """A prompt whose last prefill chunk is one token (a query of length one with a context,
    which is not a decode step: no token was sampled before it), then decode steps."""
    assert chunks[-1] == 1
    return chunked_prefill_case(cid, cfg, chunks, decode, pins or (
        f"a {sum(chunks)}-token prompt in chunks of {', '.join(map(str, chunks))} (the last one "
        f"token), then {decode} decode steps"))


def long_decode_case(cid, cfg, prefill, steps, chunk=None, pins=None):
    """A prefill (in chunks of at most `chunk` tokens), then `steps` decode steps one token at a
    time."""
    pre = [forward_step((0, c)) for c in (_chunks(prefill, chunk) if chunk else [prefill])]
    return schedule_case(cid, cfg, [prefill + steps], pre + [forward_step((0, 1), repeat=steps)],
                         pins or f"{steps} decode steps after a {prefill}-token prefill, to "
                                 f"position {prefill + steps - 1}", prompts=[prefill])


def preemption_case(cid, cfg, prompts, before, alone, after, pins=None):
    """Two requests prefilled together and decoded `before` steps; request 1 is then preempted
    (its cache entries freed, as a paged engine does when its KV cache runs out), request 0
    decodes `alone` steps to its end, and request 1 resumes: its first forward recomputes
    everything it holds (the recompute policy), then it decodes `after` - 1 more steps. With
    16-token blocks, prompts[1] + before a multiple of 16 and prompts[0] + before + alone within
    request 0's blocks, a cache of exactly the blocks they hold makes a paged engine preempt
    request 1 at that step and resume it only once request 0 has finished."""
    steps = [forward_step((0, prompts[0]), (1, prompts[1])),
             forward_step((0, 1), (1, 1), repeat=before),
             {"op": "preempt", "request": 1},
             forward_step((0, 1), repeat=alone),
             forward_step((1, 1), repeat=after)]
    held = prompts[1] + before
    return schedule_case(cid, cfg, [prompts[0] + before + alone, held + after], steps,
                         pins or f"request 1 preempted after {before} decode steps, resumed once "
                                 f"request 0 has finished by recomputing its {held} tokens",
                         prompts=prompts)


def predictable_mtp(weights: dict, cfg, layer_scale=0.3, hidden_share=0.1) -> dict:
    """Weights whose MTP drafts are often right, so that verification accepts drafts at every
    depth (random MTP weights never learned to predict the main model: their drafts are almost
    never accepted). Every layer's attention and FFN outputs (o_proj, down_proj) are scaled by
    `layer_scale`, so the main model's next token depends mostly on the current one, and each
    module's eh_proj is [I ; hidden_share I]: it sees the embedding of its input token and a
    little of h^(k-1) (enough that a wrong h^(k-1) shows in its logits), so it predicts what the
    main model will."""
    w = dict(weights)
    d = cfg.hidden_size
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = (np.asarray(w[name], np.float64) * layer_scale).astype(w[name].dtype)
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        eh = np.concatenate([np.eye(d), hidden_share * np.eye(d)], axis=1)  # [d, 2d]
        w[names.eh_proj(names.mtp_layer(cfg, k))] = eh.astype(np.float32)
    return w


def speculation_case(cid, cfg, depth, prompt, new, pins=None):
    """Greedy MTP speculation over predictable_mtp weights: some drafts are accepted at depth 2
    and most rejected, so that verification both commits several tokens in one forward and
    rolls the cache back, and module k >= 2 runs on drafts. Its routing margins are designed;
    its stream's are not (no stream_margin in its params): planting them (plant_stream_margins)
    makes the drafts always right, and on a 300-token stream it converges to one repeated
    token."""
    rng = case_rng(cid)
    w = predictable_mtp(mtp_weights(cfg, rng), cfg)
    ids = rng.integers(0, cfg.vocab_size, (1, prompt)).astype(np.int64)
    params = {"max_new_tokens": new, "depth": depth,
              "schedule": {"format": SCHEDULE_FORMAT,
                           "steps": [{"op": "speculate", "depth": depth, "max_new_tokens": new}]}}
    return designed(Case(cid, "mtp_speculation", pins or f"greedy MTP speculation, {depth} drafts "
                                                         f"per round, {new} tokens to position "
                                                         f"{prompt + new - 1}",
                         {"input_ids": ids}, params=params, config=cfg, weights=w))


def default_cases(tiny, tiny_mtp):
    """Small scenarios for the default suite (seconds): each serving path once, on the tiny
    preset cut to two layers (one dense, one MoE) to keep the suite small."""
    t = tiny(num_hidden_layers=2)
    return [
        ("scenario.chunked_prefill.small", lambda c: chunked_prefill_case(
            c, t, [1, 14, 3, 45, 5, 12],
            pins="prefill in chunks of 1, 14, 3, 45, 5, 12 (chunk edges cross 16 and 64)")),
        ("scenario.prefix_cache.small", lambda c: prefix_cache_case(c, t, 20, 5, 7, 6)),
        ("scenario.ragged_batch.small", lambda c: ragged_batch_case(c, t, [9, 17, 4], 4)),
        ("scenario.mixed_step.small", lambda c: mixed_step_case(c, t)),
        ("scenario.prefix_blocks.small", lambda c: prefix_blocks_case(c, t, [16, 17])),
        ("scenario.preemption.small", lambda c: preemption_case(c, t, [10, 14], 2, 3, 4)),
        ("scenario.decode.past_256", lambda c: long_decode_case(
            c, t, 240, 60, pins="60 decode steps from position 240 to 299: past the first KV "
                                "block of 256 and past original_max_position_embeddings 64")),
        ("scenario.speculation.depth2.short", lambda c: speculation_case(
            c, tiny_mtp(2, num_hidden_layers=2), 2, 6, 24)),
    ]


def suite(cfg, cfg_mtp, long_cfg):
    """The `scenarios` suite: every serving path at the real MLA widths (cfg: the engine suite's
    config, which vLLM's CPU MLA kernel runs), at lengths past 256, 512, 1024 and 4096 (long_cfg:
    the same with a context of 5120), tens of seconds to minutes to generate."""
    t = cfg()
    return [
        ("scenario.chunked_prefill.crossing", lambda c: chunked_prefill_case(
            c, t, [1, 14, 3, 45, 5, 190, 42],
            pins="300 tokens in chunks of 1, 14, 3, 45, 5, 190, 42: chunk edges cross 16, 64, 256")),
        ("scenario.chunked_prefill.aligned", lambda c: chunked_prefill_case(
            c, t, [1, 15, 17, 31, 65, 127, 44],
            pins="300 tokens in chunks of 1, 15, 17, 31, 65, 127, 44: chunk edges land on 16, 64, 256")),
        ("scenario.final_chunk", lambda c: final_chunk_case(c, t, [32, 32, 1], 8)),
        ("scenario.prefix_cache.long", lambda c: prefix_cache_case(
            c, t, 100, 30, 40, 150,
            pins="a 100-token prefix computed once, reused by a second request that grows to 290")),
        ("scenario.prefix_blocks.16", lambda c: prefix_blocks_case(c, t, [16, 15, 17], decode=15)),
        ("scenario.prefix_blocks.64", lambda c: prefix_blocks_case(c, t, [64, 63, 65], decode=15)),
        ("scenario.prefix_blocks.256", lambda c: prefix_blocks_case(c, t, [256, 255, 257], decode=15)),
        ("scenario.ragged_batch.long", lambda c: ragged_batch_case(
            c, t, [33, 70, 5], 200, pins="prompts of 33 and 70 tokens in one forward, a 5-token "
                                         "prefill mixed with their decode steps, then 200 decode "
                                         "steps of all three")),
        ("scenario.mixed_step", lambda c: mixed_step_case(c, t)),
        ("scenario.preemption", lambda c: preemption_case(c, t, [40, 60], 4, 20, 10)),
        ("scenario.decode.long", lambda c: long_decode_case(
            c, t, 20, 300, pins="300 decode steps after a 20-token prefill, to position 319")),
        ("scenario.decode.past_512", lambda c: long_decode_case(
            c, t, 500, 24, pins="a 500-token prefill in one forward, then 24 decode steps across "
                                "position 512, to 523")),
        ("scenario.decode.past_1024", lambda c: long_decode_case(
            c, t, 1010, 24, pins="a 1010-token prefill in one forward, then 24 decode steps "
                                 "across position 1024, to 1033")),
        ("scenario.decode.past_4096", lambda c: long_decode_case(
            c, long_cfg(), 4085, 24, pins="a 4085-token prefill in one forward, then 24 decode "
                                          "steps across position 4096, to 4108")),
        ("scenario.speculation.depth2", lambda c: speculation_case(c, cfg_mtp(2), 2, 5, 300)),
        ("scenario.speculation.depth3", lambda c: speculation_case(c, cfg_mtp(3), 3, 7, 120)),
    ]


def speculation_aux(case, out):
    """tokens_margin (greedy_aux) and the routing margins of the main and MTP traces."""
    return {**greedy_aux(case, out), **model_aux(case, out)}


KINDS = (
    kind("schedule", run_schedule, schedule_required,
         "requests run through a serving schedule (chunks, shared prefix, ragged batches); "
         "expected: each request alone", aux=schedule_aux, alone=alone_schedule,
         inputs="`request.<r>.input_ids` [1, n_r] int64 for r = 0, 1, ...; params `schedule`; "
                "config.json + model.safetensors",
         outputs="for each request r, over the positions the schedule computes for it (from its "
                 "shared prefix length L_r, 0 when none, to n_r - 1): `request.<r>.embed`, "
                 "`request.<r>.layers.N.*` (the prefill names), `request.<r>.final_hidden`, "
                 "**`request.<r>.logits`** [1, n_r - L_r, vocab]"),
    kind("mtp_speculation", run_speculation, ["tokens"],
         "greedy MTP speculative decoding: the token stream, the main trace at committed "
         "positions and each module's incremental trace; expected: plain greedy and "
         "teacher-forced MTP", aux=speculation_aux, alone=alone_speculation,
         inputs="`input_ids` [1, P]; params `max_new_tokens` N, `depth` D, `schedule`; model "
                "with D MTP layers",
         outputs="**`tokens`** [1, N] (equal to plain greedy), then the prefill names (`embed`, "
                 "`layers.N.*`, `final_hidden`, `logits` [1, P + N - 1, vocab]) at every "
                 "committed position (rejected drafts' positions left out), then the "
                 "`mtp_prefill` names `mtp.k.*` (`mtp.k.logits` [1, P + N - k, vocab]) at module "
                 "k's committed indices, as the draft chain computes them incrementally"),
)
