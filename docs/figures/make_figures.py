"""The figures of docs/math.md, every number computed through refimpl (nothing re-derived here).

    python docs/figures/make_figures.py [--out DIR]     (needs the `figures` extra: matplotlib)

Writes, into DIR (default: this script's folder):
- yarn_ramp.png   which rope dimensions YaRN keeps, blends and interpolates (V3 config, rope.py)
- mla_cache.png   MLA's cache per token against full multi-head attention (accounting.py)
- routing.png     a hand-made routing example: groups kept, experts chosen, and the bias
                  changing the selection but not the weights (moe.py)
and returns the numbers each figure shows (tests/test_figures.py checks them).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402

from refimpl import accounting, moe, rope  # noqa: E402
from refimpl.config import Config  # noqa: E402

FILES = ("yarn_ramp.png", "mla_cache.png", "routing.png")
DPI = 80
REGION_COLOURS = {"kept": "#d8e8f5", "blended": "#fdebd0", "interpolated": "#e3f1dc"}


def _save(fig, path: str) -> None:
    # no timestamp or version in the file: the same numbers give the same bytes
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, pil_kwargs={"optimize": True})
    plt.close(fig)


# ---- (a) YaRN over the rope dimensions (section 4.3) ---------------------------------------------

def yarn_data(cfg: Config) -> dict:
    """The ramp and both frequency tables of `cfg`, from refimpl.rope."""
    rs, d_r = cfg.rope_scaling, cfg.qk_rope_head_dim
    low, high = rope.correction_range(rs, d_r, cfg.rope_theta)
    ramp = rope.linear_ramp(low, high, d_r // 2)
    base = rope.base_inv_freq(d_r, cfg.rope_theta)
    yarn = rope.inv_freq(cfg)
    i = np.arange(d_r // 2)
    return {"low": low, "high": high, "ramp": ramp, "inv_freq": base, "inv_freq_yarn": yarn,
            "kept": i[ramp == 0].tolist(), "blended": i[(ramp > 0) & (ramp < 1)].tolist(),
            "interpolated": i[ramp == 1].tolist(), "factor": rs.factor,
            "original_len": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
            "sqrt_t": rope.yarn_mscale(rs.factor, rs.mscale_all_dim),
            "softmax_scale": rope.softmax_scale(cfg)}


def yarn_figure(data: dict, path: str) -> None:
    n = len(data["ramp"])
    i = np.arange(n)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    for ax in (top, bottom):
        for region, colour in REGION_COLOURS.items():
            for j in data[region]:
                ax.axvspan(j - 0.5, j + 0.5, color=colour, lw=0)
    top.semilogy(i, 2 * np.pi / data["inv_freq"], "o-", ms=3, color="#555555",
                 label="RoPE: 2 pi / inv_freq[i]")
    top.semilogy(i, 2 * np.pi / data["inv_freq_yarn"], "s-", ms=3, color="#c0392b",
                 label=f"YaRN (s = {data['factor']:g})")
    top.axhline(data["original_len"], color="k", ls="--", lw=0.8)
    top.text(0, data["original_len"] * 1.4,
             f"original context L = {data['original_len']} (alpha = {data['beta_slow']:g} turn)",
             fontsize=8)
    fast = data["original_len"] / data["beta_fast"]
    top.axhline(fast, color="k", ls=":", lw=0.8)
    top.text(0, fast * 1.4, f"L / beta = {data['original_len']} / {data['beta_fast']:g} "
             f"(beta = {data['beta_fast']:g} turns)", fontsize=8)
    top.set_ylabel("wavelength (positions)")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"YaRN on the {2 * n} rope dimensions (d_h^R) of the V3 config: pairs (2i, 2i+1)",
                  fontsize=10)
    bottom.step(i, data["ramp"], where="mid", color="#1f4e79")
    bottom.set_ylabel("ramp r[i]")
    bottom.set_xlabel("frequency index i  (rotates rope dimensions 2i and 2i+1)")
    bottom.set_xlim(-0.5, n - 0.5)
    bottom.set_ylim(-0.1, 1.15)
    labels = {"kept": f"kept (r = 0): i <= {data['low']}",
              "blended": f"blended: {data['low']} < i < {data['high']}",
              "interpolated": f"interpolated (/ s, r = 1): i >= {data['high']}"}
    for region, text in labels.items():
        js = data[region]
        bottom.text((js[0] + js[-1]) / 2, 1.02, text, ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# ---- (b) MLA's cache per token (section 2.1.1) ----------------------------------------------------

def cache_data(cfg: Config) -> dict:
    """accounting.kv_cache for `cfg` in BF16, with each side's parts from the config."""
    kv = accounting.kv_cache(cfg, "bf16")
    h = cfg.num_attention_heads
    mla_parts = {"c^KV (d_c)": cfg.kv_lora_rank, "k^R (d_h^R)": cfg.qk_rope_head_dim}
    mha_parts = {f"K ({h} x {cfg.qk_head_dim})": h * cfg.qk_head_dim,
                 f"V ({h} x {cfg.v_head_dim})": h * cfg.v_head_dim}
    if sum(mla_parts.values()) != kv["mla_values_per_token_per_layer"] \
            or sum(mha_parts.values()) != kv["mha_values_per_token_per_layer"]:
        raise AssertionError("the parts do not add up to accounting.kv_cache's totals")
    return {"kv_cache": kv, "mla_parts": mla_parts, "mha_parts": mha_parts}


def cache_figure(data: dict, path: str) -> None:
    """Left: each cache's parts per token per layer, MLA on its own axis (0-835 values: 512 and 64
    stay visible) above full MHA (0-41,000); every part labelled on its bar, no legend.
    Right: the cache of a long context, both on one log axis."""
    kv = data["kv_cache"]
    fig = plt.figure(figsize=(9, 3.2))
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 2], height_ratios=[1, 1])
    colours = ["#1f4e79", "#7fb3d5", "#922b21", "#e6b0aa"]
    text_colours = ["white", "black", "white", "black"]
    mla, mha = kv["mla_values_per_token_per_layer"], kv["mha_values_per_token_per_layer"]
    rows = [("MLA", data["mla_parts"], mla * 1.45), ("full MHA", data["mha_parts"], mha * 1.02)]
    k = 0
    for y, (label, parts, limit) in enumerate(rows):
        ax = fig.add_subplot(grid[y, 0])
        x = 0
        for name, v in parts.items():
            ax.barh(0, v, left=x, height=0.6, color=colours[k])
            inside = v / limit > 0.25  # room for the label on the bar
            ax.text(x + v / 2 if inside else x + v + limit * 0.01, 0, f"{name}: {v:,}",
                    ha="center" if inside else "left", va="center", fontsize=8,
                    color=text_colours[k] if inside else "black")
            x, k = x + v, k + 1
        ax.set_xlim(0, limit)
        ax.set_ylim(-0.5, 0.5)
        ax.set_yticks([0], [label])
        ax.tick_params(labelsize=8)
        if y == 0:
            ax.set_title(f"per token per layer: MLA {mla:,} = {100 * kv['mla_fraction_of_mha']:.2f}% "
                         f"of full MHA's {mha:,} (two scales)", fontsize=9)
        else:
            ax.set_xlabel("values cached per token per layer", fontsize=8)
    right = fig.add_subplot(grid[:, 1])
    gb = [kv["mla_bytes_context"] / 1e9, kv["mha_bytes_context"] / 1e9]
    right.bar([0, 1], gb, color=[colours[0], colours[2]])
    right.set_xticks([0, 1], ["MLA", "full MHA"])
    right.set_yscale("log")
    for x, v in enumerate(gb):
        right.text(x, v * 1.15, f"{v:,.2f} GB", ha="center", fontsize=8)
    right.set_ylim(1, gb[1] * 6)
    right.set_ylabel("GB (log scale)")
    right.set_title(f"{kv['context_tokens']:,} tokens, {kv['layers']} layers, BF16", fontsize=9)
    fig.suptitle("KV cache: MLA's latent (c^KV, k^R) against full multi-head K and V", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ---- (c) routing (section 2.1.2) -----------------------------------------------------------------

# One token, 16 routed experts in 4 groups of 4, keep M = 2 groups, choose K_r = 4 experts
# (K_r / M = 2: a group is scored by its top 2), V3's routed scaling 2.5.  Affinities s are what
# eq. (15) would give; the bias pushes overloaded expert 0 down and experts 4, 5 up.
ROUTING_EXAMPLE = {
    "scores": [0.90, 0.20, 0.15, 0.10, 0.55, 0.50, 0.45, 0.10,
               0.60, 0.58, 0.05, 0.05, 0.30, 0.25, 0.20, 0.15],
    "bias": [-0.30, 0.0, 0.0, 0.0, 0.10, 0.05, 0.0, 0.0,
             0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    "n_group": 4, "topk_group": 2, "top_k": 4, "routed_scaling_factor": 2.5,
}


def routing_data(example: dict = ROUTING_EXAMPLE) -> dict:
    """Route the example with and without the bias through refimpl.moe."""
    s = np.array([example["scores"]], dtype=np.float64)  # [T = 1, E]
    b = np.array(example["bias"], dtype=np.float64)
    G, M, K = example["n_group"], example["topk_group"], example["top_k"]
    scale = example["routed_scaling_factor"]
    out = {"scores": s[0], "bias": b, "n_group": G}
    for case, bias in (("without_bias", None), ("with_bias", b)):
        biased = s if bias is None else s + bias
        group_score = moe.group_scores(biased, G, "noaux_tc")  # top-2 sum per group
        masked = moe.group_mask(biased, G, M, "noaux_tc")  # -inf outside the M kept groups
        kept = np.unique(np.flatnonzero(np.isfinite(masked[0])) // (s.shape[-1] // G))
        idx = moe.select_experts(s, bias, G, M, K, "noaux_tc")
        g = moe.routing_weights(s, idx, True, scale)  # from s: the bias never enters
        out[case] = {"group_scores": group_score[0], "groups_kept": kept.tolist(),
                     "masked": masked[0], "experts": idx[0].tolist(), "weights": g[0]}
    # what the weights would be if the bias entered them (the early vLLM defect, spec section 9)
    idx = np.array([out["with_bias"]["experts"]])
    out["with_bias"]["weights_if_bias_entered"] = moe.routing_weights(s + b, idx, True, scale)[0]
    return out


def routing_figure(data: dict, path: str) -> None:
    s, b, G = data["scores"], data["bias"], data["n_group"]
    E = len(s)
    per = E // G
    e = np.arange(E)
    group_colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    fig = plt.figure(figsize=(10, 6.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    for col, (case, title) in enumerate((("without_bias", "selection by s alone"),
                                         ("with_bias", "selection by s + b (eq. 16)"))):
        ax = fig.add_subplot(grid[0, col])
        r = data[case]
        sel = s + (b if case == "with_bias" else 0.0)
        for g in range(G):
            if g in r["groups_kept"]:
                ax.axvspan(g * per - 0.5, (g + 1) * per - 0.5, color="#eeeeee", lw=0)
            ax.text((g + 0.5) * per - 0.5, 1.02, f"group {g}\ntop-2 sum {r['group_scores'][g]:.2f}"
                    + ("\nkept" if g in r["groups_kept"] else "\nmasked (-inf)"),
                    ha="center", va="bottom", fontsize=7)
        colours = [group_colours[i // per] for i in e]
        ax.bar(e, s, color=colours, alpha=0.45)
        if case == "with_bias":
            ax.scatter(e, sel, marker="_", s=120, color="k", zorder=3)
        chosen = r["experts"]
        ax.bar(chosen, s[chosen], color=[colours[i] for i in chosen], edgecolor="k", lw=1.5)
        ax.set_ylim(0, 1.35)
        ax.set_xticks(e)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{title}: experts {chosen}", fontsize=9)
        # one legend swatch per group colour: an expert's bar has its group's colour
        light = tuple(Patch(color=c, alpha=0.45) for c in group_colours)
        dark = tuple(Patch(facecolor=c, edgecolor="k", lw=1.5) for c in group_colours)
        handles, labels = [light, dark], ["s (colour: the group)", "chosen"]
        if case == "with_bias":
            handles.insert(0, Line2D([], [], color="k", marker="_", ls="", ms=10))
            labels.insert(0, "s + b")
        ax.legend(handles, labels, handler_map={tuple: HandlerTuple(ndivide=None, pad=0)},
                  fontsize=7, loc="center right", bbox_to_anchor=(1.0, 0.5), handlelength=4)
    ax = fig.add_subplot(grid[1, :])
    r = data["with_bias"]
    chosen = r["experts"]
    x = np.arange(len(chosen))
    ax.bar(x - 0.2, r["weights"], 0.4, color="#1f4e79",
           label="g = 2.5 s_i / sum s (refimpl: eqs. 13-14 times the routed scaling)")
    ax.bar(x + 0.2, r["weights_if_bias_entered"], 0.4, color="#cccccc", hatch="//",
           label="if the bias entered the weights (wrong)")
    for xi, v in zip(x, r["weights"]):
        ax.text(xi - 0.2, v + 0.02, f"{v:.3f}", ha="center", fontsize=7)
    ax.set_xticks(x, [f"expert {i}" for i in chosen], fontsize=8)
    ax.set_ylabel("routing weight g", fontsize=8)
    ax.set_ylim(0, max(r["weights"].max(), r["weights_if_bias_entered"].max()) * 1.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("the weights of the chosen experts come from s, not s + b", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# ---- all -----------------------------------------------------------------------------------------

def figure_data() -> dict:
    """{file name: the numbers its figure shows}."""
    cfg = Config.preset("deepseek-v3")
    return {"yarn_ramp.png": yarn_data(cfg), "mla_cache.png": cache_data(cfg),
            "routing.png": routing_data()}


def make_all(out_dir: str) -> dict:
    """Write every figure into out_dir; return figure_data()."""
    os.makedirs(out_dir, exist_ok=True)
    data = figure_data()
    yarn_figure(data["yarn_ramp.png"], os.path.join(out_dir, "yarn_ramp.png"))
    cache_figure(data["mla_cache.png"], os.path.join(out_dir, "mla_cache.png"))
    routing_figure(data["routing.png"], os.path.join(out_dir, "routing.png"))
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Draw the figures of docs/math.md through refimpl.")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                   help="folder for the PNG files (default: docs/figures)")
    args = p.parse_args(argv)
    make_all(args.out)
    for name in FILES:
        path = os.path.join(args.out, name)
        print(f"{path}: {os.path.getsize(path):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
