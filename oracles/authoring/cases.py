"""Case kinds: what a golden case computes, written once and used three ways.

A case is inputs (arrays as stored on disk), parameters, and for model cases a config and a
checkpoint. Its kind is one function `run(case, dtype) -> {output name: array}` that computes the
outputs with refimpl, in dataflow order. The same function

- makes the expected values (float64, exact),
- calibrates the tolerances (run again in float32 and in emulated bf16, see calibration.py),
- is the clean candidate and, with one refimpl function patched, each mutant (mutants.py).

Adding a case kind is one function and one `register(...)` call at the bottom of this file
(kinds.py says what a kind is). Output names are fixed; each registration documents its inputs
and outputs, and docs/conformance.md's table of kinds is generated from them
(`python -m oracles.authoring.doc_tables --write docs/conformance.md`). Model cases use
refimpl's trace names (`embed`, `layers.N.attn_out`, `layers.N.topk_idx`, `final_hidden`,
`logits`, ...).
"""

from __future__ import annotations

import numpy as np

from refimpl import fp8, generate, losses, mla, moe, mtp, names, norm, rope
from refimpl.backend import array_module, to_numpy
from refimpl.trace import recorder

from . import scenarios
from .kinds import Kind, case_model, greedy_aux, kind, model_aux, routing_margin

KINDS: dict[str, Kind] = {}


def register(name: str, run, required, doc: str, aux=None, alone=None, inputs: str = "",
             outputs: str = "") -> None:
    KINDS[name] = kind(name, run, required, doc, aux, alone, inputs, outputs)


# ---------------------------------------------------------------------------------------------
# Component kinds
# ---------------------------------------------------------------------------------------------


def run_rms_norm(case, dtype):
    x, w = case.inputs["x"], case.inputs["weight"]
    return {"y": norm.rms_norm(x, w, case.params["eps"])}  # [n, d]


def run_yarn_tables(case, dtype):
    """inv_freq [d_R/2], cos/sin [n_pos, d_R/2] (times the cos/sin factor), softmax_scale [1]."""
    cfg = case.config
    freqs = rope.inv_freq(cfg)
    cos, sin = rope.cos_sin(case.inputs["positions"], freqs, rope.cos_sin_factor(cfg))
    return {"inv_freq": freqs.astype(dtype), "cos": cos.astype(dtype), "sin": sin.astype(dtype),
            "softmax_scale": np.array([rope.softmax_scale(cfg)], dtype=dtype)}


def run_rope_apply(case, dtype):
    """x [b, s, H, d_R] at positions [s] -> rotated x, adjacent pairs (the checkpoint's layout)."""
    cfg = case.config
    x = case.inputs["x"]
    cos, sin = rope.cos_sin(case.inputs["positions"], rope.inv_freq(cfg), rope.cos_sin_factor(cfg),
                            array_module(x))
    return {"out": rope.apply_rope(x, cos, sin)}


def _mla(case, x, positions, cache=None, start=0, form="naive"):
    """mla.attention_block on the case's weights -> its recorded intermediates."""
    cfg = case.config
    w = {k: case.inputs[k] for k in names.attention_keys(cfg)}
    xp = array_module(x)
    cos, sin = rope.cos_sin(positions, rope.inv_freq(cfg), rope.cos_sin_factor(cfg), xp)
    mask = mla.causal_mask(positions, np.arange(start + x.shape[1]), xp)
    out = {}
    mla.attention_block(x, w, cfg, cos, sin, mask, rope.softmax_scale(cfg), form, cache, start,
                        recorder(out))
    return out


def run_mla(case, dtype):
    """MLA on normalised x [b, s, d] at positions 0..s-1, naive or absorbed (params.form)."""
    x = case.inputs["x"]
    return _mla(case, x, np.arange(x.shape[1]), form=case.params["form"])


def run_mla_decode(case, dtype):
    """One token x [b, 1, d] at position `start` against a filled cache (normalised c_kv
    [b, start, d_c] and roped k_rope [b, start, d_R] in the checkpoint's pair layout)."""
    x, c, k = case.inputs["x"], case.inputs["cache_c_kv"], case.inputs["cache_k_rope"]
    start = c.shape[1]
    xp = array_module(x)
    slot = tuple(xp.concatenate([a, xp.zeros((a.shape[0], 1, a.shape[2]), a.dtype)], axis=1)
                 for a in (c, k))  # the filled cache with room for the new token
    return _mla(case, x, np.array([start]), slot, start, form=case.params.get("form", "absorbed"))


def run_gate(case, dtype):
    """The router: scores [T, E], chosen experts [T, K] (largest first), weights [T, K]."""
    bias = case.inputs.get("bias")
    s, idx, g = moe.route(case.inputs["u"], case.inputs["gate_weight"], bias, case.config)
    return {"router_scores": s, "topk_idx": idx.astype(np.int64), "topk_weight": g}


def gate_aux(case, out):
    return {"topk_margin": routing_margin(out["router_scores"], case.inputs.get("bias"), case.config)}


def run_moe(case, dtype):
    """One MoE layer without the residual: shared + gated routed experts.  x [T, d] -> out [T, d]."""
    cfg, inp = case.config, case.inputs
    experts = [{k: inp[f"experts.{e}.{k}"] for k in names.FFN_PROJ}
               for e in range(cfg.n_routed_experts)]
    shared = {k: inp[f"shared_experts.{k}"] for k in names.FFN_PROJ} if cfg.n_shared_experts else None
    out = {}
    y = moe.moe_ffn(inp["x"], inp["gate_weight"], inp.get("bias"), experts, shared, cfg,
                    recorder(out))
    out["out"] = y
    return out


def moe_aux(case, out):
    return {"topk_margin": routing_margin(out["router_scores"], case.inputs.get("bias"), case.config)}


def run_fp8_dequant(case, dtype):
    """W = q * s per 128x128 block (partial edge blocks).  q e4m3 [out, in], scale_inv f32."""
    return {"w": fp8.dequantize(case.inputs["q"], case.inputs["scale_inv"], dtype=dtype)}


# ---------------------------------------------------------------------------------------------
# Model kinds
# ---------------------------------------------------------------------------------------------


def run_prefill(case, dtype):
    """logits [b, s, vocab] of input_ids [b, s] from position 0, with every named intermediate."""
    trace = {}
    case_model(case, dtype).forward(case.inputs["input_ids"], trace=trace)
    return trace


def run_decode(case, dtype):
    """Prefill the first params.prefill tokens in one forward, then decode the rest one token at
    a time through the latent cache; outputs are the decode steps' trace, concatenated on seq."""
    ids = case.inputs["input_ids"]
    p = case.params["prefill"]
    model = case_model(case, dtype)
    cache = model.new_cache(batch=ids.shape[0], max_len=ids.shape[1])
    model.forward(ids[:, :p], cache=cache)
    steps = []
    for j in range(p, ids.shape[1]):
        tr = {}
        model.forward(ids[:, j:j + 1], cache=cache, trace=tr)
        steps.append(tr)
    return {k: np.concatenate([st[k] for st in steps], axis=1) for k in steps[0]}


def run_greedy(case, dtype):
    """Greedy continuation of prompt input_ids [1, P]: params.max_new_tokens ids [1, n]."""
    model = case_model(case, dtype)
    toks = generate.greedy(model, case.inputs["input_ids"][0], case.params["max_new_tokens"])
    return {"tokens": np.array([toks], dtype=np.int64)}


def run_fp8_quant(case, dtype):
    """Weight block quantisation (spec section 7): w [out, in] -> q (e4m3 values, as float)
    and scale_inv [ceil(out/128), ceil(in/128)], s = max(amax, 1e-4) / 448 per tile."""
    q, s = fp8.quantize(to_numpy(case.inputs["w"]))  # a host routine (ml_dtypes' e4m3)
    return {"q": fp8.decode_e4m3(q, np.float64).astype(dtype), "scale_inv": s.astype(dtype)}


def run_fp8_act_quant(case, dtype):
    """Activation quantisation per token per 128 channels: x [T, K] -> q (e4m3 values, as float)
    [T, K] and s [T, ceil(K/128)]."""
    q, s = fp8.quantize_activations(to_numpy(case.inputs["x"]))
    return {"q": fp8.decode_e4m3(q, np.float64).astype(dtype), "s": s.astype(dtype)}


# ---------------------------------------------------------------------------------------------
# MTP kinds and training-time values (spec sections 5, 6)
# ---------------------------------------------------------------------------------------------


def run_mtp_prefill(case, dtype):
    """Teacher-forced MTP over input_ids [b, T]: the main trace and logits, then for each depth
    k = 1..D the module's trace under mtp.k.* and mtp.k.logits [b, T-k, vocab] (index i predicts
    t_{i+k+1}). Conventions: refimpl's mtp.DEFAULT (embedding first, h^0 after the final norm)."""
    trace = {}
    case_model(case, dtype).forward(case.inputs["input_ids"], trace=trace, mtp=True,
                                mtp_conventions=mtp.DEFAULT)
    return trace


def mtp_required(case):
    return ["logits"] + [f"mtp.{k}.logits" for k in range(1, case.config.num_nextn_predict_layers + 1)]


def run_mtp_module(case, dtype):
    """One MTP module k (params.k) alone: input_ids [b, s] are the tokens t_{i+k}, h_prev
    [b, s, d] is h^{k-1}_i; indices i = 0..s-1 -> the module's trace under mtp.k.*."""
    trace = {}
    model = case_model(case, dtype)
    h_prev = model.xp.asarray(case.inputs["h_prev"], dtype=dtype)
    model.mtp_module(case.params["k"], case.inputs["input_ids"], h_prev, 0, None, trace, mtp.DEFAULT)
    return trace


def run_speculative(case, dtype):
    """Greedy speculative decoding with the MTP modules (params.depth drafts per round): the
    token stream, which must equal plain greedy decoding."""
    model = case_model(case, dtype)
    rep = generate.decode(model, case.inputs["input_ids"][0], case.params["max_new_tokens"],
                          use_mtp=True, depth=case.params["depth"], conventions=mtp.DEFAULT)
    return {"tokens": np.array([rep.tokens], dtype=np.int64)}


def run_training(case, dtype):
    """Training-time values: balance loss (eqs. 17-20) of scores [T, E] with the chosen experts
    idx [T, K], the expert load and the updated bias (b_i += gamma sign(mean load - load_i)),
    and the MTP losses (eqs. 24-25) of mtp_logits.k [b, T-k, V] for tokens [b, T]."""
    inp, p = case.inputs, case.params
    idx = inp["idx"]
    load = losses.expert_load(idx, inp["scores"].shape[-1])
    out = {"balance_loss": np.array([losses.balance_loss(inp["scores"], idx.shape[-1], p["alpha"],
                                                         selected=idx)], dtype=dtype),
           "expert_load": load.astype(dtype),
           "bias_updated": losses.update_bias(inp["bias"], load, p["gamma"]).astype(dtype)}
    d = p["depth"]
    logits = [inp[f"mtp_logits.{k}"] for k in range(1, d + 1)]
    out["mtp_depth_losses"] = np.array([losses.mtp_depth_loss(lg, inp["tokens"], k)
                                        for k, lg in enumerate(logits, 1)], dtype=dtype)
    out["mtp_loss"] = np.array([losses.mtp_loss(logits, inp["tokens"], p["lam"])], dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Registration: name, computation, outputs a candidate must provide, doc (the manifest's line),
# and the inputs and outputs as docs/conformance.md shows them (**required**)
# ---------------------------------------------------------------------------------------------

_PREFILL_TRACE = ("`embed`, per layer N: `layers.N.{attn_norm, c_q, q_nope, q_rope, c_kv, k_rope, "
               "attn_out, h_attn, ffn_norm, router_scores, topk_idx, topk_weight, ffn_out, hidden}` "
               "(routing names in MoE layers only), `final_hidden` (after the final norm)")

register("rms_norm", run_rms_norm, ["y"], "RMSNorm y = x / sqrt(mean(x^2) + eps) * w",
         inputs="`x` [n, d], `weight` [d]; params `eps`", outputs="**`y`**")
register("yarn_tables", run_yarn_tables, ["inv_freq", "cos", "sin", "softmax_scale"],
         "RoPE/YaRN frequencies, cos/sin tables at given positions, softmax scale",
         inputs="`positions` [n] int64; config.json",
         outputs="**`inv_freq`** [d_R/2], **`cos`**, **`sin`** [n, d_R/2] (times the cos/sin "
                 "factor), **`softmax_scale`** [1]")
register("rope_apply", run_rope_apply, ["out"], "RoPE applied to adjacent pairs at given positions",
         inputs="`x` [b, s, H, d_R], `positions` [s]; config.json",
         outputs="**`out`** (adjacent pairs (2i, 2i+1) rotated)")
register("mla", run_mla, ["attn_out"], "MLA prefill (naive or absorbed form), causal",
         inputs="`x` [b, s, d] (normalised hidden), attention weights by checkpoint name "
                "(`q_a_proj`, `q_a_layernorm`, `q_b_proj` or `q_proj`, `kv_a_proj_with_mqa`, "
                "`kv_a_layernorm`, `kv_b_proj`, `o_proj`), each [out, in]; params `form` "
                "(naive/absorbed); config.json",
         outputs="`c_q`, `q_nope`, `q_rope`, `c_kv`, `k_rope`, **`attn_out`**")
register("mla_decode", run_mla_decode, ["attn_out"], "one MLA decode step against a filled cache",
         inputs="as `mla` with `x` [b, 1, d] at position `start`, `cache_c_kv` [b, start, d_c] "
                "(normalised), `cache_k_rope` [b, start, d_R] (roped, adjacent-pair layout)",
         outputs="`c_q`, `q_nope`, `q_rope`, `c_kv`, `k_rope` (the new token's), **`attn_out`**")
register("gate", run_gate, ["topk_idx", "topk_weight"], "router scores, expert choice and weights",
         aux=gate_aux,
         inputs="`u` [T, d], `gate_weight` [E, d], `bias` [E] (float32; absent for softmax "
                "scoring); config.json",
         outputs="`router_scores` [T, E], **`topk_idx`** [T, K] int, **`topk_weight`** [T, K]")
register("moe", run_moe, ["out"], "one DeepSeekMoE layer (shared + routed experts)", aux=moe_aux,
         inputs="`x` [T, d], `gate_weight`, `bias`, `experts.<e>.{gate,up,down}_proj`, "
                "`shared_experts.{gate,up,down}_proj`; config.json",
         outputs="`router_scores`, `topk_idx`, `topk_weight`, **`out`** (no residual)")
register("fp8_dequant", run_fp8_dequant, ["w"], "FP8 e4m3 block dequantisation",
         inputs="`q` [out, in] F8_E4M3, `scale_inv` [ceil(out/128), ceil(in/128)] F32",
         outputs="**`w`**")
register("prefill", run_prefill, ["logits"], "model prefill: logits and named intermediates",
         aux=model_aux, inputs="`input_ids` [b, s] int64; config.json + model.safetensors",
         outputs=_PREFILL_TRACE + ", **`logits`** [b, s, vocab]")
register("decode", run_decode, ["logits"], "incremental decode through the latent cache",
         aux=model_aux, inputs="`input_ids` [b, P + n]; params `prefill` = P",
         outputs="the same names for the n decode steps, concatenated along seq: **`logits`** "
                 "[b, n, vocab]")
register("greedy", run_greedy, ["tokens"], "greedy token stream", aux=greedy_aux,
         inputs="`input_ids` [1, P]; params `max_new_tokens` = n", outputs="**`tokens`** [1, n] int")
register("mtp_prefill", run_mtp_prefill, mtp_required,
         "teacher-forced MTP: main and MTP logits with named intermediates", aux=model_aux,
         inputs="`input_ids` [b, T]; config.json + model.safetensors with the MTP layers",
         outputs="the prefill names, then for each depth k: `mtp.k.{embed, h_prev, eh_proj, "
                 "layer.<the decoder-layer names>, head_norm, logits, hidden}`; **`logits`**, "
                 "**`mtp.k.logits`** [b, T-k, vocab] (index i predicts t_{i+k+1})")
register("mtp_module", run_mtp_module, lambda c: [f"mtp.{c.params['k']}.logits"],
         "one MTP module (eqs. 21-23) on given tokens and h^{k-1}", aux=model_aux,
         inputs="`input_ids` [b, s] = the tokens t_{i+k}, `h_prev` [b, s, d] = h^{k-1}_i; "
                "params `k`",
         outputs="`mtp.k.*` as above, **`mtp.k.logits`**")
register("speculative", run_speculative, ["tokens"], "greedy speculative (MTP) token stream",
         aux=greedy_aux, inputs="`input_ids` [1, P]; params `max_new_tokens`, `depth`",
         outputs="**`tokens`** [1, n] (greedy speculative decoding: equals plain greedy)")
register("training", run_training, ["balance_loss", "bias_updated", "mtp_loss"],
         "balance loss, bias update and MTP loss values",
         inputs="`scores` [T, E], `idx` [T, K], `bias` [E], `tokens` [b, T+1], `mtp_logits.k` "
                "[b, T+1-k, V]; params `alpha`, `gamma`, `lam`, `depth`",
         outputs="**`balance_loss`** [1] (eqs. 17-20), `expert_load` [E], **`bias_updated`** [E], "
                 "`mtp_depth_losses` [D] (eq. 24), **`mtp_loss`** [1] (eq. 25)")
register("fp8_quant", run_fp8_quant, ["q", "scale_inv"], "FP8 e4m3 block quantisation of a weight",
         inputs="`w` [out, in]",
         outputs="**`q`** (the e4m3 values, as float), **`scale_inv`** [ceil(out/128), "
                 "ceil(in/128)]")
register("fp8_act_quant", run_fp8_act_quant, ["q", "s"],
         "FP8 activation quantisation per token per 128 channels",
         inputs="`x` [T, K]", outputs="**`q`**, **`s`** [T, ceil(K/128)]")

KINDS.update({k.name: k for k in scenarios.KINDS})  # schedule, mtp_speculation
