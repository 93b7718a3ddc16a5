"""Goldens of a real checkpoint (issue 18, item 7): model cases whose model is the user's own
checkpoint directory (DeepSeek-V3, V2, a fine-tune), referenced by a digest of its config,
index and safetensors headers and never copied into the suite.

    oracles generate --checkpoint DIR --tokens tokens.npy [--layers N] --out G
    oracles check G --checkpoint DIR (CANDIDATE | --adapter ... | --engine ...)

A case's manifest entry has "model": true and

    "checkpoint": {"format": 1, "digest": "<64 hex>", "layers": N or null,
                   "source_layers": <num_hidden_layers of the checkpoint's config>}

and its files are config.json (the config the case runs: the checkpoint's, with
num_hidden_layers = N and no MTP layers when --layers N), inputs.safetensors and
expected.safetensors.  `digest` is checkpoint_digest(DIR): sha256 over config.json, the index
(if any) and every shard's name and header, in name order, plus the first and last 64 KiB of
each shard's tensor data - the headers fix every tensor's name, dtype, shape and place; the
bodies (688 GB) are only spot-checked, so a checkpoint whose bodies were changed elsewhere
behind identical headers is not refused - its outputs then differ from the expected ones and
FAIL, never PASS.  check/run refuse a checkpoint whose digest differs.

The kinds are the suite's own (prefill, decode, greedy, mtp_prefill; cases.py), run through the
same emulate.run_case: the expected values in float64, the tolerances calibrated by running the
case again in float32, bf16 and fp8 with the checkpoint's tensors cast per precision as they are
read (CheckpointWeights.prepared), exactly as emulate.prepared casts in-memory weights.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from refimpl.checkpoint import Checkpoint, tensor_plan
from refimpl.config import Config
from refimpl.errors import RefimplError

from . import OraclesError

DIGEST_FORMAT = 1
SPOT = 1 << 16  # bytes of tensor data hashed at the start and at the end of each shard


def checkpoint_digest(path: str) -> str:
    """sha256 of a checkpoint's identity: config.json, model.safetensors.index.json (if
    present) and, for every *.safetensors file in name order, its name, header length, header
    bytes and the first and last SPOT bytes of its tensor data (a spot check of the bodies:
    about 20 MB of the published checkpoint's 688 GB are read)."""
    h = hashlib.sha256(f"refimpl checkpoint digest {DIGEST_FORMAT}\n".encode())
    try:
        listing = sorted(os.listdir(path))
        for fname in ("config.json", "model.safetensors.index.json"):
            if fname in listing:
                with open(os.path.join(path, fname), "rb") as f:
                    data = f.read()
                h.update(f"{fname} {len(data)}\n".encode() + data)
        for fname in (f for f in listing if f.endswith(".safetensors")):
            with open(os.path.join(path, fname), "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                if n > 100 * 2**20:
                    raise OraclesError(f"{os.path.join(path, fname)}: header length {n} is not "
                                       "a safetensors header")
                data = head + f.read(n)
                data += f.read(SPOT)  # the first and last bytes of the tensor data
                size = os.fstat(f.fileno()).st_size
                f.seek(max(f.tell(), size - SPOT))
                data += f.read(SPOT)
            h.update(f"{fname} {len(data)}\n".encode() + data)
    except OSError as e:
        raise OraclesError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    return h.hexdigest()


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
        from .emulate import _cast
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
        from refimpl.model import Model

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
    from refimpl.cli import _load_tokens

    try:
        return _load_tokens(path).astype(np.int64)
    except RefimplError as e:
        raise OraclesError(f"--tokens {e}") from None


def checkpoint_cases(path: str, tokens: np.ndarray, layers: int | None = None,
                     new_tokens: int = 4) -> list:
    """The model cases of a checkpoint golden: prefill, decode (the first half prefilled, the
    rest one token at a time), greedy (from the first row), and teacher-forced MTP when the
    checkpoint has its MTP layers and is not truncated."""
    from .schema import Case

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


def bind(entry: dict, checkpoint: str | None, digests: dict) -> CheckpointWeights:
    """A manifest entry's checkpoint reference bound to the directory the user gave, after its
    digest is checked (digests: path -> digest, computed once)."""
    ref = entry["checkpoint"]
    cid = entry["id"]
    if checkpoint is None:
        raise OraclesError(f"case {cid!r} was generated from a checkpoint that the suite does not "
                           f"hold (digest {ref['digest'][:16]}...): pass --checkpoint DIR")
    if checkpoint not in digests:
        digests[checkpoint] = checkpoint_digest(checkpoint)
    if digests[checkpoint] != ref["digest"]:
        raise OraclesError(f"--checkpoint {checkpoint}: its digest {digests[checkpoint][:16]}... is "
                           f"not the {ref['digest'][:16]}... case {cid!r} was generated from: "
                           "another checkpoint (its config, index, a tensor header or the spot-checked tensor bytes differ)")
    return CheckpointWeights(checkpoint, ref["layers"])


def validate_reference(ref, where) -> None:
    """The manifest's "checkpoint" field (manifest.validate_case)."""
    import re

    if not isinstance(ref, dict) or set(ref) != {"format", "digest", "layers", "source_layers"}:
        raise where.error("checkpoint", "must be an object of format, digest, layers, source_layers")
    if ref["format"] != DIGEST_FORMAT:
        raise where.error("checkpoint.format", f"is {ref['format']!r}, this checker reads {DIGEST_FORMAT}")
    if not (isinstance(ref["digest"], str) and re.fullmatch(r"[0-9a-f]{64}", ref["digest"])):
        raise where.error("checkpoint.digest", "must be 64 lower-case hex digits")
    for k in ("layers", "source_layers"):
        v = ref[k]
        if not (v is None and k == "layers") and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise where.error(f"checkpoint.{k}", "must be a positive integer" + (" or null" if k == "layers" else ""))




def reference_of(w: CheckpointWeights) -> dict:
    """The manifest's "checkpoint" field for a case of checkpoint `w`."""
    return {"format": DIGEST_FORMAT, "digest": checkpoint_digest(w.path), "layers": w.layers,
            "source_layers": w.ckpt.config.num_hidden_layers}
