"""An adapter for Hugging Face transformers' DeepseekV3ForCausalLM (the `peer` extra): an
independent implementation run on the golden model cases in float32, eager attention.

    oracles check GOLDEN --adapter oracles.hf_adapter:factory

Each model case directory is loaded as a checkpoint with from_pretrained. Besides the logits it
reports the intermediates it can observe through forward hooks, under refimpl's trace names:
embed, layers.N.{attn_norm, c_q, c_kv, attn_out, h_attn?, ffn_norm, router_scores, topk_idx,
topk_weight, ffn_out, hidden}, final_hidden. (q_rope/k_rope are not reported: transformers may
hold them in its permuted layout; q_nope is not observable without patching.)
"""

from __future__ import annotations

import numpy as np

MODEL_KINDS = ("prefill", "decode", "greedy")


class TransformersAdapter:
    def __init__(self, dtype: str = "float32"):
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        self.dtype = getattr(torch, dtype)
        transformers.logging.set_verbosity_error()  # load reports and rope notes off the report
        transformers.utils.logging.disable_progress_bar()

    def supports(self, case):
        if case.kind == "schedule":
            return ("this adapter runs each request alone in one forward; it cannot express a "
                    "serving schedule (chunked prefill, a shared prefix, a ragged batch)")
        if case.kind.startswith("mtp") or case.kind == "speculative":
            n = case.config.num_hidden_layers
            if n != 61:
                return (f"transformers runs MTP only as checkpoint layer 61 (a 61-layer main "
                        f"model); this case has {n} layers, so it drops the MTP layers")
            return "MTP through transformers' MtpModel is not wired into this adapter"
        if case.kind.startswith("fp8") or (case.config is not None
                                           and case.config.extra.get("quantization_config")):
            return "transformers' FP8 path needs a GPU (fine-grained FP8 kernels); no FP8 on CPU"
        if case.kind not in MODEL_KINDS:
            return f"transformers has no standalone entry point for component kind {case.kind!r}"
        cfg = case.config
        if cfg.scoring_func != "sigmoid" or cfg.topk_method != "noaux_tc":
            return ("transformers' DeepseekV3 router implements only sigmoid scoring with "
                    f"noaux_tc (this case: {cfg.scoring_func}, {cfg.topk_method})")
        if cfg.moe_layer_freq != 1:
            return "transformers' DeepseekV3 ignores moe_layer_freq != 1"
        return True

    # ---- helpers ---------------------------------------------------------------------------
    def _load(self, case):
        torch = self.torch
        model = self.transformers.DeepseekV3ForCausalLM.from_pretrained(
            case.path, dtype=self.dtype, attn_implementation="eager")
        model.eval()
        return model

    def _hooks(self, model, store):
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
            if attn.q_a_layernorm is not None:
                handles.append(attn.q_a_layernorm.register_forward_hook(keep(p + "c_q")))
            handles.append(attn.kv_a_layernorm.register_forward_hook(keep(p + "c_kv")))
            handles.append(attn.register_forward_hook(keep(p + "attn_out", lambda o: o[0])))
            handles.append(layer.post_attention_layernorm.register_forward_hook(keep(p + "ffn_norm")))
            handles.append(layer.mlp.register_forward_hook(keep(p + "ffn_out")))
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                def gate_hook(module, args, output, p=p):
                    logits, weights, idx = output
                    shape = args[0].shape[:-1]
                    for name, v in (("router_scores", logits.sigmoid()), ("topk_idx", idx),
                                    ("topk_weight", weights)):
                        arr = v.detach()
                        arr = (arr if arr.dtype == self.torch.int64 else arr.float()).numpy().copy()
                        arr = arr.reshape(*shape, arr.shape[-1])
                        store.setdefault(p + name, []).append(arr)
                handles.append(gate.register_forward_hook(gate_hook))
        return handles

    def _forward(self, model, ids, cache=None):
        torch = self.torch
        with torch.no_grad():
            out = model(torch.tensor(ids), cache=cache, use_cache=cache is not None,
                        output_hidden_states=True)
        return out

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
        ids = np.asarray(case.inputs["input_ids"], dtype=np.int64)
        if case.kind == "greedy":
            return {"tokens": self._greedy(model, ids, case.params["max_new_tokens"])}
        store = {}
        handles = self._hooks(model, store)
        try:
            if case.kind == "prefill":
                self._hidden(self._forward(model, ids), n, store)
            else:  # decode: prefill, then one token at a time through transformers' cache
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


def factory():
    """float32 weights and arithmetic (check with --profile float32)."""
    return TransformersAdapter("float32")


def factory_bf16():
    """bfloat16 weights and activations, as engines serve the model (--profile bf16)."""
    return TransformersAdapter("bfloat16")
