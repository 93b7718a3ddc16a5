"""What a case kind is (one function `run(case, dtype) -> {output name: array}` and the outputs a
candidate must give), and what several kinds share: routing margins (how far each token is
from choosing differently), the case's model, and the expected-only tensors of model kinds.
The kinds themselves are registered in cases.py (and scenarios.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from refimpl import fp8, moe, names
from refimpl.config import Config
from refimpl.model import Model

from .precision import paired_fp8


@dataclass(frozen=True)
class Kind:
    name: str
    run: Callable  # (case, dtype) -> {name: array} in dataflow order
    required: Callable  # (case) -> names a candidate must provide
    doc: str  # one line, written into the manifest
    aux: Callable | None = None  # (case, outputs) -> expected-only tensors (routing margins)
    alone: Callable | None = None  # (case, dtype) -> the expected outputs, when `run` takes
    # another path to them (scenario kinds: run = through the schedule, alone = each request alone)
    inputs: str = ""  # the tensors and parameters a case gives (Markdown: docs/conformance.md's
    outputs: str = ""  # kind tables are generated from these two; required outputs in **bold**)


def kind(name: str, run, required, doc: str, aux=None, alone=None, inputs: str = "",
         outputs: str = "") -> Kind:
    """A Kind; `required` a list of output names or a function (case) -> names. `inputs` and
    `outputs` document the kind's tensors for docs/conformance.md (oracles.authoring.doc_tables),
    each required output as **`name`**."""
    return Kind(name, run, required if callable(required) else (lambda c, r=tuple(required): r),
                doc, aux, alone, inputs, outputs)


# ---------------------------------------------------------------------------------------------
# Routing margins: how far each token is from choosing differently
# ---------------------------------------------------------------------------------------------


def routing_margin(scores, bias, cfg: Config) -> np.ndarray:
    """Per token, the smallest gap that decides its expert set: between the topk_group-th and the
    next group score, and between the K-th and the next selectable biased score. A token whose
    margin is within a profile's rounding may legitimately pick another set.  [T, E] -> [T]"""
    s = np.asarray(scores, dtype=np.float64)
    biased = s if (bias is None or not cfg.uses_bias) else s + np.asarray(bias, np.float64)
    t, e = biased.shape
    margin = np.full(t, np.inf)
    if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
        gs = -np.sort(-moe.group_scores(biased, cfg.n_group, cfg.topk_method), axis=-1)
        margin = np.minimum(margin, gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group])
        biased = moe.group_mask(biased, cfg.n_group, cfg.topk_group, cfg.topk_method)
    k = cfg.num_experts_per_tok
    if k < e:
        bs = -np.sort(-biased, axis=-1)
        gap = bs[:, k - 1] - bs[:, k]
        margin = np.minimum(margin, np.where(np.isfinite(gap), gap, np.inf))
    return margin


# ---------------------------------------------------------------------------------------------
# Model kinds: the case's model and its expected-only tensors
# ---------------------------------------------------------------------------------------------

# The array module the reference runs a case on (None: numpy), set by emulate.run_case for its
# run: a kind's model is made on it (case_model), its component functions follow their inputs.
_DEVICE = contextvars.ContextVar("oracles_device", default=None)


@contextlib.contextmanager
def placed(xp):
    """Within the block, model kinds build their model on xp's device (None: the CPU)."""
    token = _DEVICE.set(xp)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def case_model(case, dtype):
    """The case's model; weights kept as stored FP8 (fp8.BlockFP8, emulate.prepared for the fp8
    profile) run through the FP8 GEMM, as an FP8 engine runs them. A case as written (a stored
    FP8 checkpoint's e4m3 weights with their _scale_inv, edges.fp8_model_case) is read as the
    float64 reference reads it: dequantised.  A case of a user's checkpoint
    (checkpoint_cases.CheckpointWeights) builds its Model over that directory.  On the device
    `placed` names."""
    device = _DEVICE.get()
    if not isinstance(case.weights, dict):
        return case.weights.model(dtype, "cpu" if device is None else device)
    if any(k.endswith("_scale_inv") for k in case.weights):
        case = dataclasses.replace(case, weights=paired_fp8(case.weights, "float64"))
    stored_fp8 = any(isinstance(w, fp8.BlockFP8) for w in case.weights.values())
    return Model.from_arrays(case.config, case.weights, dtype=np.dtype(dtype).name,
                             fp8_activations=stored_fp8, device="cpu" if device is None else device)


def _layer_of_trace(case, name) -> int:
    """The checkpoint layer of a trace name: layers.N.* -> N, mtp.K.layer.* -> the MTP layer."""
    parts = name.split(".")
    if parts[0] == "mtp":
        return names.mtp_layer(case.config, int(parts[1]))
    return int(parts[1])


def model_aux(case, out):
    """topk_margin [b, s] for every MoE layer (MTP modules' layers included)."""
    aux = {}
    for name, s in out.items():
        if name.endswith(".router_scores"):
            i = _layer_of_trace(case, name)
            bias = case.weights.get(names.gate_bias(i))
            b, t, e = s.shape
            aux[name.replace("router_scores", "topk_margin")] = \
                routing_margin(s.reshape(b * t, e), bias, case.config).reshape(b, t)
    return aux


def greedy_aux(case, out):
    """tokens_margin [1, n]: the gap between the best and second-best logit at each step."""
    ids = np.concatenate([case.inputs["input_ids"], out["tokens"][:, :-1]], axis=1)
    logits = np.asarray(case_model(case, np.float64).forward(ids))[:, case.inputs["input_ids"].shape[1] - 1:]
    top2 = -np.sort(-logits, axis=-1)[..., :2]
    return {"tokens_margin": top2[..., 0] - top2[..., 1]}
