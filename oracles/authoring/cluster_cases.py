"""`oracles generate --ray`: a suite's cases computed on a Ray cluster's workers, one task per
case (expected values and the calibration runs of every profile), the files written by this
process as without Ray.  The workers get this process's BLAS thread settings
(refimpl.cluster.blas_env), so that a suite generated on one machine is byte-identical with and
without --ray; across machines another BLAS kernel can differ in the last bits (issue 21)."""

from __future__ import annotations

import os

from refimpl.cluster import blas_env, connect
from refimpl.errors import RefimplError

from .. import OraclesError


def compute_on_cluster(address: str, compute, jobs: dict) -> dict:
    """{case id: compute(*args)} for jobs {case id: args}, each a Ray task; `compute` is a
    module-level function (Ray sends it by name)."""
    try:
        ray = connect(address)
    except RefimplError as e:
        raise OraclesError(str(e)) from None
    env = blas_env()
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    task = ray.remote(compute).options(num_cpus=1, max_retries=0, runtime_env={"env_vars": env})
    refs = {cid: task.remote(*args) for cid, args in jobs.items()}
    out = {}
    for cid, ref in refs.items():
        try:
            out[cid] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            text = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise OraclesError(f"case {cid!r} failed on a Ray worker: {text[:300]}") from None
        except ray.exceptions.RayError as e:
            raise OraclesError(f"case {cid!r}: its Ray worker was lost ({type(e).__name__}); "
                               "nothing was written") from None
    return out
