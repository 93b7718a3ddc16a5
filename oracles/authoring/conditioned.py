"""Goldens conditioned on a candidate's routing: the reference recomputed (float64) with the
candidate's expert choice forced at the tokens where it resolved a forgiven near-tie the other
way (refimpl's forced routing: moe.route's `forced`, Model.forward's `routes`), so that what
follows such a token is still judged, against what the reference gives after the same choice,
instead of being left out (taint.py).

This module runs refimpl's forward pass: it sits above the checking layer, which only calls the
`Conditioner` it is handed (check.run_check's `conditioner`), so that reading and judging a
suite without it never imports the forward pass (tests/oracles/test_imports.py). `oracles
check` hands it over for every case with a model.

A recomputation replaces the expected values only at the positions the forced tokens reach
(taint.Layout): everywhere else the golden stays as written, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from refimpl import generate, moe, mtp, names

from ..format import taint as taint_mod
from ..format.checkpoint_ref import CheckpointRef
from .cases import KINDS
from .checkpoint_cases import CheckpointWeights
from .kinds import case_model, model_aux
from .mutants import MUTANTS
from .precision import prepared
from .scenarios import request_name, request_tokens

KINDS_CONDITIONED = ("prefill", "decode", "mtp_prefill", "mtp_module", "schedule",
                     "mtp_speculation", "gate", "moe", "greedy", "speculative")
STREAM_KINDS = ("greedy", "speculative", "mtp_speculation")


class Conditioner:
    """The reference of one case, recomputable with forced routing. `mutant`: the one the
    case's expected values follow (a conventions case's `expected_under`), or None."""

    def __init__(self, case, mutant=None, tokens=None):
        self._case, self.mutant, self.tokens = case, mutant, tokens
        self._model = None
        self.recomputations = 0

    @property
    def case(self):
        """The case (a callable that loads it is called once, when first needed)."""
        if callable(self._case):
            self._case = self._case()
        if isinstance(self._case.weights, CheckpointRef):  # a user's checkpoint, as emulate runs it
            self._case = dataclasses.replace(self._case,
                                             weights=CheckpointWeights.of(self._case.weights))
        return self._case

    @contextlib.contextmanager
    def _context(self):
        with contextlib.ExitStack() as st:
            if self.mutant is not None:
                st.enter_context(self.mutant.patch(self.case))
            yield prepared(self.case, "float64")

    def model(self, work):
        if self._model is None:
            self._model = case_model(work, np.float64)
        return self._model

    # ---- forced routes by output name -> refimpl's routes ------------------------------------

    def _layer(self, name: str) -> int:
        """The checkpoint layer of a routing output name (request prefix stripped)."""
        parts = name.split(".")
        if parts[0] == "mtp":
            return names.mtp_layer(self.case.config, int(parts[1]))
        return int(parts[1])

    @staticmethod
    def _stem(name: str) -> tuple[int, str]:
        """request.<r>.<rest> -> (r, rest); other names -> (0, name)."""
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "request" and parts[1].isdigit():
            return int(parts[1]), ".".join(parts[2:])
        return 0, name

    def routes(self, forced: dict, offset=lambda r: 0, chain=None) -> dict:
        """forced {routing name: (mask [b, s] bool, experts [b, s, K])} -> refimpl's routes
        {layer: {(row, index + offset(request)): experts}} (of one request when `chain`)."""
        out = {}
        for name, (mask, experts) in forced.items():
            r, rest = self._stem(name)
            if chain is not None and r != chain:
                continue
            layer = self._layer(rest)
            for row, i in np.argwhere(np.asarray(mask, bool)):
                out.setdefault(layer, {})[(int(row), int(i) + offset(r))] = \
                    [int(e) for e in np.asarray(experts)[row, i]]
        return out

    # ---- recomputation ---------------------------------------------------------------------------

    def recompute(self, forced: dict) -> dict:
        """The case's outputs and routing margins with the forced routing, float64."""
        self.recomputations += 1
        kind = self.case.kind
        with self._context() as work:
            out = getattr(self, f"_{kind}")(work, forced)
        aux = KINDS[kind].aux(self.case, out) if KINDS[kind].aux and kind != "mtp_speculation" else {}
        if kind == "mtp_speculation":
            aux = model_aux(self.case, out)
        return {k: np.asarray(v) for k, v in {**out, **aux}.items()}

    def _trace(self, work, ids, routes, **kw):
        trace = {}
        self.model(work).forward(np.asarray(ids, np.int64), trace=trace, routes=routes, **kw)
        return trace

    def _prefill(self, work, forced):
        return self._trace(work, work.inputs["input_ids"], self.routes(forced))

    def _decode(self, work, forced):
        """The decode steps' positions prefill.. of a whole-sequence forward (equal to the
        incremental decode to float64 rounding, refimpl's tests)."""
        p = work.params["prefill"]
        tr = self._trace(work, work.inputs["input_ids"], self.routes(forced, lambda r: p))
        return {k: v[:, p:] for k, v in tr.items()}

    def _mtp_prefill(self, work, forced):
        return self._trace(work, work.inputs["input_ids"], self.routes(forced), mtp=True,
                           mtp_conventions=mtp.DEFAULT)

    def _mtp_module(self, work, forced):
        trace = {}
        h_prev = np.asarray(work.inputs["h_prev"], np.float64)
        self.model(work).mtp_module(work.params["k"], work.inputs["input_ids"], h_prev, 0, None,
                                    trace, mtp.DEFAULT, routes=self.routes(forced))
        return trace

    def _schedule(self, work, forced):
        """Each request alone (the expected values), with its own forced tokens and those of
        the requests whose cache entries it reads (shared prefixes): the same tokens, so the
        same choices there reproduce the shared entries."""
        tokens = request_tokens(work)
        lay = taint_mod.Layout("schedule", [], work.params)
        start = [lay.offset(r) for r in range(len(tokens))]
        out = {}
        for r, t in enumerate(tokens):
            routes = self.routes(forced, lambda q: start[q], chain=r)
            for q in range(len(tokens)):
                if q == r or not lay.threshold(q, r):
                    continue
                thr = lay.threshold(q, r)
                for layer, at in self.routes(forced, lambda q_: start[q_], chain=q).items():
                    for (row, pos), e in at.items():
                        if pos < thr:
                            routes.setdefault(layer, {})[(row, pos)] = e
            tr = self._trace(work, t[None, :], routes)
            out.update({request_name(r, k): v[:, start[r]:] for k, v in tr.items()})
        return out

    def _mtp_speculation(self, work, forced):
        """Teacher-forced over the prompt and the expected stream (the golden's tokens)."""
        depth = work.params["depth"]
        seq = np.concatenate([work.inputs["input_ids"], self.tokens], axis=1)
        tr = self._trace(work, seq, self.routes(forced), mtp=True, mtp_conventions=mtp.DEFAULT)
        main = {k: v[:, :-1] for k, v in tr.items() if not k.startswith("mtp.")}
        mods = {k: v for k, v in tr.items() if k.startswith("mtp.") and int(k.split(".")[1]) <= depth}
        return {"tokens": self.tokens, **main, **mods}

    def _forced_flat(self, forced):
        got = forced.get("topk_idx")
        if got is None:
            return None
        mask, experts = got
        at = np.flatnonzero(np.asarray(mask, bool).reshape(-1))
        k = np.shape(experts)[-1]
        return at, np.asarray(experts).reshape(-1, k)[at]

    def _gate(self, work, forced):
        inp = work.inputs
        s, idx, g = moe.route(inp["u"], inp["gate_weight"], inp.get("bias"), work.config,
                              self._forced_flat(forced))
        return {"router_scores": s, "topk_idx": idx.astype(np.int64), "topk_weight": g}

    def _moe(self, work, forced):
        cfg, inp = work.config, work.inputs
        experts = [{k: inp[f"experts.{e}.{k}"] for k in names.FFN_PROJ}
                   for e in range(cfg.n_routed_experts)]
        shared = {k: inp[f"shared_experts.{k}"] for k in names.FFN_PROJ} if cfg.n_shared_experts else None
        out = {}
        y = moe.moe_ffn(inp["x"], inp["gate_weight"], inp.get("bias"), experts, shared, cfg,
                        lambda n, v: out.__setitem__(n, v), forced=self._forced_flat(forced))
        out["out"] = y
        return out

    # ---- a token stream that went another way at a near-tie ---------------------------------

    def restream(self, head):
        """The expected stream after the candidate's first `len(head)` tokens `head`: plain
        greedy decoding continued from the prompt and head (float64), and each step's logit
        margin (the best against the second-best logit). -> (tokens [1, n], margins [1, n])"""
        if self.case.kind not in STREAM_KINDS:
            raise ValueError(f"kind {self.case.kind!r} has no token stream")
        self.recomputations += 1
        head = [int(t) for t in np.asarray(head).reshape(-1)]
        with self._context() as work:
            model = self.model(work)
            prompt = np.asarray(work.inputs["input_ids"], np.int64)[0]
            n = work.params["max_new_tokens"]
            stream = head + generate.greedy(model, np.concatenate([prompt, np.array(head, np.int64)]),
                                            n - len(head))
            ids = np.concatenate([prompt, np.array(stream[:-1], np.int64)])[None, :]
            logits = np.asarray(model.forward(ids))[:, len(prompt) - 1:]
        top2 = -np.sort(-logits, axis=-1)[..., :2]
        return np.array([stream], np.int64), top2[..., 0] - top2[..., 1]

    # ---- the runner-up choice of a near-tie (logits-only candidates) ---------------------------

    def alternatives(self, expected: dict, name: str, flat: int, eps: float) -> list:
        """The expert sets token `flat` of routing output `name` takes if one of its close
        decisions went the other way, closest first: the topk_group-th group against the next
        one, and the K-th expert against the next, each when its gap is within eps (from the
        expected router scores)."""
        cfg = self.case.config
        stem = name[: -len("topk_idx")]
        s = np.asarray(expected[stem + "router_scores"], np.float64)
        s = s.reshape(-1, s.shape[-1])[flat]
        bias = None
        if cfg.uses_bias:
            _, rest = self._stem(name)
            if "." in rest:  # a model case: the layer's gate bias in the checkpoint
                bias = self.case.weights.get(names.gate_bias(self._layer(rest)))
            else:  # a component case: an input
                bias = self.case.inputs.get("bias")
        biased = s if bias is None else s + np.asarray(bias, np.float64)
        k, e = cfg.num_experts_per_tok, biased.shape[-1]
        grouped = cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group
        per = e // cfg.n_group

        def best(groups):
            allowed = np.repeat(np.isin(np.arange(cfg.n_group), groups), per)
            x = np.where(allowed, biased, -np.inf)
            return sorted(np.argsort(-x, kind="stable")[:k].tolist())
        options = []
        kept = None
        if grouped:
            gs = moe.group_scores(biased[None], cfg.n_group, cfg.topk_method)[0]
            order = np.argsort(-gs, kind="stable")
            kept = order[:cfg.topk_group]
            options.append((gs[order[cfg.topk_group - 1]] - gs[order[cfg.topk_group]],
                            best(np.concatenate([kept[:-1], order[cfg.topk_group:cfg.topk_group + 1]]))))
        allowed = np.repeat(np.isin(np.arange(cfg.n_group), kept), per) if grouped else np.ones(e, bool)
        x = np.where(allowed, biased, -np.inf)
        order = np.argsort(-x, kind="stable")
        if k < allowed.sum():
            alt = order[:k].tolist()
            alt[-1] = int(order[k])
            options.append((x[order[k - 1]] - x[order[k]], sorted(alt)))
        return [o for _, o in sorted(options, key=lambda o: o[0]) if _ <= eps]


def conditioner_for(entry, load, expected):
    """The Conditioner of a suite's case (check.run_check's `conditioner`), or None for a kind
    it does not recompute. load() -> the case; expected: its expected tensors."""
    if entry["kind"] not in KINDS_CONDITIONED:
        return None
    mutant = MUTANTS.get(entry.get("expected_under"))
    tokens = np.asarray(expected["tokens"], np.int64) if "tokens" in expected else None
    return Conditioner(load, mutant, tokens)
