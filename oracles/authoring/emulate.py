"""Running a case's refimpl computation in a chosen precision.

Precisions (the tolerance profiles are calibrated from these):
- float64: the truth.
- float32: inputs and weights as float32, refimpl's float32 working dtype.
- bf16: weights and inputs rounded to bfloat16 (the gate bias stays float32, as checkpoints
  store it), float32 arithmetic, and every tensor that DeepSeek's own inference code stores in
  bf16 (inference/model.py under torch.set_default_dtype(torch.bfloat16)) rounded to bfloat16,
  through refimpl's one precision hook, `refimpl.ops.rounding(round_bf16)`: linear maps (SwiGLU's
  projections, the MTP modules' eh_proj and the heads included), RMSNorms (enorm, hnorm and
  shared_head.norm included), the attention softmax, RoPE, SwiGLU's silu(gate) and its product
  with up, the residual stream after attention and after the FFN, and in the MoE block each
  routed expert's weighted output (the weight cast to bf16, `weights.type_as(x)`), the running
  sum of the routed experts after each add, in ascending expert index (`y[idx] += expert(x[idx])
  * weights[idx, top, None]`, model.py:682-689), and the block's output with the shared expert
  (`y + z`, :693); the router stays float32. Why the per-add sum: when the routed outputs
  partly cancel, rounding the running sum after each add costs more, relative to the sum, than
  rounding it once, and the profile's tolerances must hold for the model's reference inference
  code. An engine that keeps more in float32 (transformers 5.24's default grouped_mm experts sum
  the K weighted outputs in float32, integrations/moe.py:524-537; MLX-LM in one reduction,
  mlx_lm/models/deepseek_v3.py:282; fused kernels) rounds less and stays inside. transformers in
  bf16 rounds at these points but the per-add sum, and RMSNorm's normalised input once more
  before the weight (modeling_deepseek_v3.py:51-52); with those two changes the emulation
  reproduces its bf16 outputs bit for bit on model.prefill.one_token (docs/conformance.md
  section 3).
- fp8: bf16 as above, and the linear maps that DeepSeek-V3 ships in FP8 (attention projections,
  expert and dense FFN weights; not the embedding, lm_head, gate or eh_proj, spec section 7)
  run through refimpl's own FP8 path: weights block-quantised by fp8.quantize and multiplied by
  fp8.fp8_gemm (activations quantised per token per 128 channels by fp8.quantize_activations,
  per-128-block float32 accumulation, as DeepSeek's fp8_gemm); model cases run
  Model(fp8_activations=True) (kinds.case_model sees the fp8.BlockFP8 weights). kv_b_proj is
  dequantised, as that path keeps it.

No refimpl function is patched for a precision: the precision is the case's arrays (`prepared`)
and the rounding policy (precision.py).  Mutants (mutants.py) do patch one refimpl function
each for the duration of a run, through patching.patched; so do the engine modes (modes.py).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from refimpl import ops
from refimpl.backend import to_numpy

from ..format.schema import Case
from ..format.checkpoint_ref import CheckpointRef
from .cases import KINDS
from .checkpoint_cases import CheckpointWeights
from .kinds import placed
from .modes import MODES
from .precision import PRECISIONS, prepared, round_bf16, working_dtype  # noqa: F401 (re-exported)

# engine modes (modes.py): a base precision above plus patches of their own
MODE_PRECISIONS = tuple(MODES)


def on_device(case: Case, xp) -> Case:
    """The case with its floating-point inputs (activations, weights of component cases) copied
    to the array module xp's device, explicitly; token ids, positions and expert indices stay on
    the host, where the bookkeeping that reads them runs, and so do e4m3 arrays (CuPy has no FP8
    dtype: their bytes are copied where a weight is decoded, fp8.dequantize_bits)."""
    def place(v):
        a = np.asarray(v)
        return xp.asarray(a) if a.dtype.kind == "f" else v  # (e4m3 and bf16 are not kind "f")
    return dataclasses.replace(case, inputs={k: place(v) for k, v in case.inputs.items()})


def run_case(case: Case, precision: str = "float64", mutant=None, alone: bool = False,
             device=None) -> dict:
    """The case's outputs from refimpl -> {name: float64 or int64 numpy array}, dataflow order.
    `mutant` (a mutants.Mutant) is patched in during the run. `alone`: the kind's standalone
    computation where it has one (the expected values of scenario kinds).  `device` (an array
    module, e.g. cupy): the case's inputs are copied there, so the component functions and the
    model (kinds.case_model follows `placed`) run on it; the outputs are copied back.  A case of
    a user's checkpoint (bound by format/golden.py) computes through checkpoint_cases."""
    kind = KINDS[case.kind]
    if isinstance(case.weights, CheckpointRef):
        case = dataclasses.replace(case, weights=CheckpointWeights.of(case.weights))
    mode = None
    if precision in MODE_PRECISIONS:
        mode, precision = MODES[precision], MODES[precision].base
    stack = contextlib.ExitStack()
    with stack:
        if precision in ("bf16", "fp8"):
            stack.enter_context(ops.rounding(round_bf16))
        if mode is not None:
            stack.enter_context(mode.patches())
        if mutant is not None:
            stack.enter_context(mutant.patch(case))
        # prepared inside the mutant: a candidate's own loading (dequantising a stored FP8
        # checkpoint, quantising for the fp8 profile) has its bug too
        work = prepared(case, precision)
        if device is not None:
            work = on_device(work, device)
            stack.enter_context(placed(device))
        out = (kind.alone if alone and kind.alone else kind.run)(work, working_dtype(precision))
    result = {}
    for k, v in out.items():
        v = to_numpy(v)
        if precision in ("bf16", "fp8"):
            v = round_bf16(v)
        result[k] = v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64)
    return result
