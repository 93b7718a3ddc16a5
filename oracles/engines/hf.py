"""transformers (the `peer` extra): DeepseekV3ForCausalLM / DeepseekV2ForCausalLM loaded from a
case's checkpoint directory with from_pretrained.

    oracles check GOLDEN --engine transformers [--engine-option dtype=bfloat16]

Options: dtype (float32 | bfloat16 | float16: weights and activations), attn_implementation
(eager | sdpa). transformers keeps its KV cache in the model's dtype (kv_cache_dtype auto).
Besides the logits it reports what forward hooks observe, under refimpl's trace names: embed,
layers.N.{attn_norm, c_q, c_kv, attn_out, ffn_norm, router_scores, topk_idx, topk_weight,
ffn_out, hidden}, final_hidden. (q_rope/k_rope are held in transformers' permuted layout and
q_nope is not observable without patching, so they are not reported.) Decode runs through
transformers' DynamicCache one forced token at a time; greedy takes the first maximum.
"""

from __future__ import annotations

import numpy as np

from . import model_case_support, resolve_options
from .serving import Outputs, Preempt, Share, steps_of

OPTIONS = {
    "dtype": ("float32", ("float32", "bfloat16", "float16"), "weights and activations"),
    "attn_implementation": ("eager", ("eager", "sdpa"), "attention kernel"),
    "kv_cache_dtype": ("auto", ("auto",), "the cache is kept in the model's dtype"),
}


class Engine:
    name = "transformers"
    SERVING = ("schedule cases: each request with its own DynamicCache; one batched call per "
               "forward step, rows left-padded (cache and new tokens), a 2D attention mask "
               "and each request's own position_ids; a shared prefix is a copy of the donor's "
               "first L cache entries; a preempted request's cache is dropped and recomputed")

    def __init__(self, options: dict | None = None):
        import torch
        import transformers

        self.options = resolve_options(self.name, OPTIONS, options or {})
        self.torch, self.transformers = torch, transformers
        self.dtype = getattr(torch, self.options["dtype"])
        transformers.logging.set_verbosity_error()  # load reports and rope notes off the report
        transformers.utils.logging.disable_progress_bar()

    def supports(self, case):
        ok = model_case_support(case, self.name, schedules=True)
        if ok is not True:
            if case.kind.startswith("mtp") or case.kind == "speculative":
                n = case.config.num_hidden_layers
                return (f"transformers runs MTP only as checkpoint layer 61 (a 61-layer main "
                        f"model); this case has {n} layers, so it drops the MTP layers")
            if case.kind.startswith("fp8"):
                return "transformers' FP8 path needs a GPU (fine-grained FP8 kernels); no FP8 on CPU"
            return f"transformers has no standalone entry point for component kind {case.kind!r}"
        cfg = case.config
        if cfg.extra.get("quantization_config"):
            return "transformers' FP8 path needs a GPU (fine-grained FP8 kernels); no FP8 on CPU"
        if cfg.model_type == "deepseek_v3" and (cfg.scoring_func != "sigmoid"
                                                or cfg.topk_method != "noaux_tc"):
            return ("transformers' DeepseekV3 router implements only sigmoid scoring with "
                    f"noaux_tc (this case: {cfg.scoring_func}, {cfg.topk_method})")
        if cfg.model_type == "deepseek_v2" and cfg.topk_method not in ("greedy", "group_limited_greedy"):
            return f"transformers' DeepseekV2 router has no topk_method {cfg.topk_method!r}"
        if cfg.moe_layer_freq != 1:
            return "transformers' DeepSeek models ignore moe_layer_freq != 1"
        return True

    def close(self):
        """Free what the adapter holds (called on the thread that built it; idempotent):
        models live only inside run(), so only the garbage collector has work left."""
        import gc

        gc.collect()

    # ---- helpers ---------------------------------------------------------------------------
    def _load(self, case):
        cls = (self.transformers.DeepseekV2ForCausalLM if case.config.model_type == "deepseek_v2"
               else self.transformers.DeepseekV3ForCausalLM)
        model = cls.from_pretrained(case.model_path, dtype=self.dtype,
                                    attn_implementation=self.options["attn_implementation"])
        model.eval()
        return model

    def _hooks(self, model, store, scoring):
        """Forward hooks that append each observed intermediate to store[name]."""
        handles = []

        def keep(name, pick=lambda o: o):
            def hook(module, args, output):
                store.setdefault(name, []).append(pick(output).detach().float().numpy().copy())
            return hook

        for i, layer in enumerate(model.model.layers):
            p = f"layers.{i}."
            handles.append(layer.input_layernorm.register_forward_hook(keep(p + "attn_norm")))
            attn = layer.self_attn
            if getattr(attn, "q_a_layernorm", None) is not None:
                handles.append(attn.q_a_layernorm.register_forward_hook(keep(p + "c_q")))
            handles.append(attn.kv_a_layernorm.register_forward_hook(keep(p + "c_kv")))
            handles.append(attn.register_forward_hook(keep(p + "attn_out", lambda o: o[0])))
            handles.append(layer.post_attention_layernorm.register_forward_hook(keep(p + "ffn_norm")))
            handles.append(layer.mlp.register_forward_hook(keep(p + "ffn_out")))
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "weight") and gate.weight.dim() == 2 \
                    and gate.weight.shape[0] != gate.weight.shape[1]:
                def gate_hook(module, args, output, p=p):
                    logits, weights, idx = output
                    shape = args[0].shape[:-1]
                    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(-1)
                    for name, v in (("router_scores", scores), ("topk_idx", idx),
                                    ("topk_weight", weights)):
                        arr = v.detach()
                        arr = (arr if arr.dtype == self.torch.int64 else arr.float()).numpy().copy()
                        arr = arr.reshape(*shape, arr.shape[-1])
                        store.setdefault(p + name, []).append(arr)
                handles.append(gate.register_forward_hook(gate_hook))
        return handles

    def _forward(self, model, ids, cache=None):
        with self.torch.no_grad():
            return model(self.torch.tensor(ids), cache=cache, use_cache=cache is not None,
                         output_hidden_states=True)

    @staticmethod
    def _hidden(out, n_layers, store):
        hs = [h.detach().float().numpy() for h in out.hidden_states]
        store.setdefault("embed", []).append(hs[0])
        for i in range(n_layers - 1):
            store.setdefault(f"layers.{i}.hidden", []).append(hs[i + 1])
        store.setdefault("final_hidden", []).append(hs[n_layers])  # after the final norm
        store.setdefault("logits", []).append(out.logits.detach().float().numpy())

    # ---- run ---------------------------------------------------------------------------------
    def run(self, case):
        model = self._load(case)
        n = case.config.num_hidden_layers
        if case.kind == "schedule":
            return self._schedule(model, case)
        ids = np.asarray(case.inputs["input_ids"], dtype=np.int64)
        if case.kind == "greedy":
            return {"tokens": self._greedy(model, ids, case.params["max_new_tokens"])}
        store = {}
        handles = self._hooks(model, store, case.config.scoring_func)
        try:
            if case.kind == "prefill":
                self._hidden(self._forward(model, ids), n, store)
            else:  # decode: prefill, then one forced token at a time through the cache
                p = case.params["prefill"]
                cache = self.transformers.DynamicCache(config=model.config)
                self._forward(model, ids[:, :p], cache)
                store.clear()
                for j in range(p, ids.shape[1]):
                    self._hidden(self._forward(model, ids[:, j:j + 1], cache), n, store)
        finally:
            for h in handles:
                h.remove()
        return {k: np.concatenate(v, axis=1) for k, v in store.items()}

    # ---- serving schedules -------------------------------------------------------------------
    def _schedule(self, model, case):
        """A `schedule` case as a serving engine built on transformers runs it (SERVING)."""
        tokens, steps = steps_of(case)
        outputs = Outputs(len(tokens))
        caches = {}  # request -> [(keys, values) per layer], each [1, heads, t, dim]
        store = {}
        handles = self._hooks(model, store, case.config.scoring_func)
        try:
            for st in steps:
                if isinstance(st, Share):  # a copy of the donor's first L cache entries
                    caches[st.request] = [(k[:, :, :st.length].clone(), v[:, :, :st.length].clone())
                                          for k, v in caches[st.donor]]
                elif isinstance(st, Preempt):  # freed: the next forward recomputes it
                    caches.pop(st.request, None)
                else:
                    self._batched_forward(model, case, tokens, st.chunks, caches, store, outputs)
        finally:
            for h in handles:
                h.remove()
        return outputs.result()

    def _batched_forward(self, model, case, tokens, chunks, caches, store, outputs):
        """One forward over every chunk: rows left-padded twice ([pad | own cache | pad | new
        tokens]), a 2D attention mask that is 1 on the request's own entries only, and each
        request's own positions (position_ids); the cache is split back per request after."""
        torch = self.torch
        b = len(chunks)
        past = [caches[c.request][0][0].shape[2] if c.request in caches else 0 for c in chunks]
        new = [c.recompute + c.n for c in chunks]
        big_c, big_n = max(past), max(new)
        ids, pos, mask = self._padded_batch(tokens, chunks, past)
        n_layers = case.config.num_hidden_layers
        data = None
        if big_c:
            data = []
            for layer in range(n_layers):
                ks, vs = [], []
                for i, c in enumerate(chunks):
                    if c.request in caches:
                        k, v = caches[c.request][layer]
                    else:  # an empty cache of the right shape
                        k0, v0 = next(iter(caches.values()))[layer]
                        k, v = k0[:, :, :0], v0[:, :, :0]
                    pad = big_c - k.shape[2]
                    ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                    vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
                data.append((torch.cat(ks), torch.cat(vs)))
        cache = self.transformers.DynamicCache(ddp_cache_data=data, config=model.config)
        store.clear()
        with torch.no_grad():
            out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos), cache=cache, use_cache=True,
                        output_hidden_states=True)
        self._hidden(out, n_layers, store)
        for i, c in enumerate(chunks):  # the request's entries, without the padding
            keep = []
            for layer in cache.layers:
                k, v = layer.keys[i:i + 1], layer.values[i:i + 1]
                lo, hi = big_c - past[i], big_c + big_n - new[i]
                keep.append((torch.cat([k[:, :, lo:big_c], k[:, :, hi:]], dim=2),
                             torch.cat([v[:, :, lo:big_c], v[:, :, hi:]], dim=2)))
            caches[c.request] = keep
        rows = {}
        for name, arrs in store.items():
            a = arrs[-1]
            if a.shape[:2] != (b, big_n):
                if a.shape[0] != b * big_n:
                    continue  # not one row per token: left out
                a = a.reshape(b, big_n, *a.shape[1:])
            rows[name] = a
        for i, c in enumerate(chunks):  # the last n rows: its new tokens (recomputed ones dropped)
            outputs.add(c.request, {k: a[i:i + 1, big_n - c.n:] for k, a in rows.items()})

    @staticmethod
    def _padded_batch(tokens, chunks, past):
        """-> input_ids [b, N], position_ids [b, N], attention mask [b, C + N]: row i is
        [pad | its C_i cached entries | pad | its n_i new tokens], the mask 1 on its own entries."""
        new = [c.recompute + c.n for c in chunks]
        big_c, big_n = max(past), max(new)
        ids = np.zeros((len(chunks), big_n), np.int64)
        pos = np.zeros((len(chunks), big_n), np.int64)
        mask = np.zeros((len(chunks), big_c + big_n), np.int64)
        for i, c in enumerate(chunks):
            first = c.start - c.recompute
            ids[i, big_n - new[i]:] = tokens[c.request][first:c.start + c.n]
            pos[i, big_n - new[i]:] = np.arange(first, c.start + c.n)
            mask[i, big_c - past[i]:big_c] = 1
            mask[i, big_c + big_n - new[i]:] = 1
        return ids, pos, mask

    def _greedy(self, model, ids, new):
        cache = self.transformers.DynamicCache(config=model.config)
        out = self._forward(model, ids, cache)
        toks = []
        for _ in range(new):
            nxt = int(self.torch.argmax(out.logits[0, -1]))  # first maximum: lower id on ties
            toks.append(nxt)
            if len(toks) == new:
                break
            out = self._forward(model, np.array([[nxt]]), cache)
        return np.array([toks], dtype=np.int64)
