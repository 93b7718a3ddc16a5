"""Goldens of a user's checkpoint (issue 18, item 7): model cases whose model is the user's own
checkpoint directory (DeepSeek-V3, V2, a fine-tune), referenced by digest and never copied
(format/checkpoint_ref.py says what the manifest holds).

    oracles generate --checkpoint DIR --tokens tokens.npy [--layers N] --out G
    oracles check G --checkpoint DIR (CANDIDATE | --adapter ... | --engine ...)

The kinds are the suite's own (prefill, decode, greedy, mtp_prefill; cases.py), run through the
same emulate.run_case: the expected values in float64, the tolerances calibrated by running the
case again in float32, bf16 and fp8 with the checkpoint's tensors cast per precision as they are
read (CheckpointWeights.prepared), exactly as precision.prepared casts in-memory weights.
"""

from __future__ import annotations

import os

import numpy as np

from refimpl.checkpoint import Checkpoint
from refimpl.cli import _load_tokens
from refimpl.config import Config
from refimpl.errors import RefimplError
from refimpl.layout import tensor_plan
from refimpl.model import Model

from .. import OraclesError
from ..format.checkpoint_ref import DIGEST_FORMAT, CheckpointRef, checkpoint_digest
from ..format.schema import Case
from .precision import _cast


def truncated(cfg: Config, layers: int | None) -> Config:
    """The config a case runs: the checkpoint's, or its first `layers` decoder layers (plus the
    final norm and head) without MTP layers (an MTP module reads the last layer's hidden state
    and is stored after it)."""
    if layers is None or layers == cfg.num_hidden_layers:
        return cfg
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise OraclesError(f"--layers {layers}: must be between 1 and the checkpoint's "
                           f"{cfg.num_hidden_layers} decoder layers")
    return cfg.replace(num_hidden_layers=layers, num_nextn_predict_layers=0,
                       first_k_dense_replace=min(cfg.first_k_dense_replace, layers))


class _Source:
    """The checkpoint read as a precision holds it (emulate.prepared's casts, per tensor when
    read), restricted to the tensors of the (truncated) config: WeightStore's source interface."""

    def __init__(self, ckpt: Checkpoint, cfg: Config, precision: str):
        self.ckpt, self.config, self.precision = ckpt, cfg, precision
        plan = tensor_plan(cfg)
        self._names = [n for n in ckpt.names() if n in plan or
                       (n.endswith("_scale_inv") and n[:-len("_scale_inv")] in plan)]
        self._set = set(self._names)

    def names(self):
        return list(self._names)

    def __contains__(self, name):
        return name in self._set

    def shape(self, name):
        return self.ckpt.shape(name)

    def dtype(self, name):
        return self.ckpt.dtype(name)

    def stored_fp8(self, name):
        return self.ckpt.stored_fp8(name)

    def stored_nbytes(self, name):
        return self.ckpt.stored_nbytes(name)

    def prefetch(self, name):
        self.ckpt.prefetch(name)

    def _cast(self, name, w64):
        return np.asarray(_cast(name, w64, self.precision))

    def weight(self, name, dtype=np.float64, out=None):
        """As emulate.prepared holds a case's stored tensors: cast to the precision (an FP8
        projection dequantised in float64 first); for the fp8 precision, a stored FP8 tensor that
        the store does not keep as stored (kv_b_proj) dequantised in float32, as
        paired_fp8 leaves it."""
        if name not in self._set:
            raise OraclesError(f"tensor {name} is not part of this case's model")
        if self.precision == "fp8" and self.ckpt.dtype(name) == "F8_E4M3":
            return self.ckpt.weight(name, np.float32)
        return self._cast(name, self.ckpt.weight(name, np.float64))

    def rows(self, name, ids, dtype=np.float64):
        return np.asarray(self._cast(name, self.ckpt.rows(name, ids, np.float64)))


class CheckpointWeights:
    """A case's weights as a reference to a checkpoint directory (never loaded whole): what
    cases._model builds its Model from, and what emulate.prepared casts per precision."""

    @classmethod
    def of(cls, ref: CheckpointRef) -> "CheckpointWeights":
        """The checkpoint a suite's case was bound to (format/golden.py), ready to compute."""
        return cls(ref.path, ref.layers)

    def __init__(self, path: str, layers: int | None = None, precision: str = "float64"):
        self.path, self.layers, self.precision = os.fspath(path), layers, precision
        self._ckpt = None

    @property
    def ckpt(self) -> Checkpoint:
        if self._ckpt is None:
            try:
                self._ckpt = Checkpoint(self.path)
                self._ckpt.check_scales()
            except RefimplError as e:
                raise OraclesError(str(e)) from None
        return self._ckpt

    def __getstate__(self):  # pickled to a Ray worker: the open checkpoint (its maps) stays here
        return {"path": self.path, "layers": self.layers, "precision": self.precision, "_ckpt": None}

    def prepared(self, precision: str) -> "CheckpointWeights":
        out = CheckpointWeights(self.path, self.layers, precision)
        out._ckpt = self._ckpt
        return out

    def config(self) -> Config:
        return truncated(self.ckpt.config, self.layers)

    def model(self, dtype, device="cpu"):
        """The Model of this case in the working dtype: FP8 projections kept as stored and run
        through the FP8 GEMM for the fp8 precision, as emulate does for in-memory weights."""
        cfg = self.config()
        return Model(cfg, _Source(self.ckpt, cfg, self.precision), dtype=np.dtype(dtype).name,
                     device=device, fp8_activations=self.precision == "fp8" and self.ckpt.fp8_tensors > 0)

    def get(self, name, default=None):
        """One tensor in float64 (the routing margins read the gate bias), or default."""
        return self.ckpt.weight(name, np.float64) if name in self.ckpt else default

    def has_mtp(self) -> bool:
        return self.layers is None and self.ckpt.has_mtp()


def load_tokens(path: str) -> np.ndarray:
    """--tokens: a .npy of integer ids [batch, seq]."""
    try:
        return _load_tokens(path).astype(np.int64)
    except RefimplError as e:
        raise OraclesError(f"--tokens {e}") from None


def checkpoint_cases(path: str, tokens: np.ndarray, layers: int | None = None,
                     new_tokens: int = 4) -> list:
    """The model cases of a checkpoint golden: prefill, decode (the first half prefilled, the
    rest one token at a time), greedy (from the first row), and teacher-forced MTP when the
    checkpoint has its MTP layers and is not truncated."""
    w = CheckpointWeights(path, layers)
    cfg = w.config()
    ck = Checkpoint(path)
    ck.check_against_config()
    b, s = tokens.shape
    bad = (tokens < 0) | (tokens >= cfg.vocab_size)
    if bad.any():
        raise OraclesError(f"--tokens: id {int(tokens[bad][0])} is outside the checkpoint's "
                           f"vocabulary [0, {cfg.vocab_size})")
    what = "the checkpoint" + (f" (its first {layers} decoder layers, head)" if layers else "")

    def case(cid, kind, pins, inputs, **params):
        return Case(cid, kind, pins, {k: np.ascontiguousarray(v) for k, v in inputs.items()},
                    params=params, config=cfg, weights=w)
    cases = [case("checkpoint.prefill", "prefill", f"{what}: prefill logits and intermediates",
                  {"input_ids": tokens})]
    if s >= 2:
        cases.append(case("checkpoint.decode", "decode", f"{what}: decode through the latent cache",
                          {"input_ids": tokens}, prefill=max(1, s // 2)))
    cases.append(case("checkpoint.greedy", "greedy", f"{what}: greedy continuation",
                      {"input_ids": tokens[:1]}, max_new_tokens=new_tokens))
    if w.has_mtp() and s >= 2:
        cases.append(case("checkpoint.mtp_prefill", "mtp_prefill",
                          f"{what}: teacher-forced MTP logits", {"input_ids": tokens}))
    return cases


def reference_of(w: CheckpointWeights) -> dict:
    """The manifest's "checkpoint" field for a case of checkpoint `w`."""
    return {"format": DIGEST_FORMAT, "digest": checkpoint_digest(w.path), "layers": w.layers,
            "source_layers": w.ckpt.config.num_hidden_layers}
