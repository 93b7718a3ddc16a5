"""A model case whose model is the user's own checkpoint, as the reading side sees it: the
manifest's reference (validated), the checkpoint's digest, and the binding of a case to the
directory the user gives (refused when its digest differs).  The cases themselves are written by
authoring/checkpoint_cases.py (docs/full-model.md section 7).

A case's manifest entry has "model": true and

    "checkpoint": {"format": 1, "digest": "<64 hex>", "layers": N or null,
                   "source_layers": <num_hidden_layers of the checkpoint's config>}

`digest` is checkpoint_digest(DIR): sha256 over config.json, the index (if any) and every
shard's name and header, in name order, plus the first and last 64 KiB of each shard's tensor
data - the headers fix every tensor's name, dtype, shape and place; the bodies (688 GB) are only
spot-checked, so a checkpoint whose bodies were changed elsewhere behind identical headers is not
refused - its outputs then differ from the expected ones and FAIL, never PASS.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from .. import OraclesError

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


@dataclass(frozen=True)
class CheckpointRef:
    """A case's model: the checkpoint directory `path`, its first `layers` decoder layers (None:
    all), its digest checked.  authoring/checkpoint_cases.CheckpointWeights computes with it."""

    path: str
    layers: int | None = None


def bind(entry: dict, checkpoint: str | None, digests: dict) -> CheckpointRef:
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
    return CheckpointRef(checkpoint, ref["layers"])


def validate_reference(ref, where) -> None:
    """The manifest's "checkpoint" field (manifest.validate_case)."""
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
