"""Ray for refimpl (the `cluster` extra): a pipeline's stages as actors (one per CPU host, or one
per GPU with num_gpus=1), and work spread over a cluster's workers.  Ray is imported inside
functions only; without it, every entry point says so in one line.

Bit-identity: a stage computes with numpy and BLAS like the driver does, so the actors get the
driver's BLAS thread settings (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS: the
driver's values where set, else its CPU count), because a BLAS may sum in another order with
another thread count (issue 21 measured last-bit differences).  On other hosts, another BLAS
kernel can still differ in the last bits.
"""

from __future__ import annotations

import os

from .errors import RefimplError
from .stages import StageWorker

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
LOCAL_OBJECT_STORE = 512 * 2**20  # a local cluster's shared-memory object store (hidden states)
# A local cluster's logical CPUs: every stage actor and case task asks for one (on a real cluster
# that spreads them over hosts), and on one machine they share its cores rather than wait.
LOCAL_CPUS = 64


def require_ray():
    try:
        import ray
    except ImportError:
        raise RefimplError("--ray needs Ray, which is not installed: pip install "
                           "'deepseek-v3-refimpl[cluster]' (ray>=2.40)") from None
    return ray


def blas_env() -> dict:
    """The driver's BLAS thread settings, for the workers (module docstring)."""
    n = next((os.environ[v] for v in BLAS_THREAD_VARS if os.environ.get(v)), str(os.cpu_count() or 1))
    return {v: os.environ.get(v) or n for v in BLAS_THREAD_VARS}


def connect(address: str | None = None, num_cpus: int | None = None):
    """ray.init once: a local cluster on this machine (address None or "local"), or join the
    cluster at `address` ("auto", "HOST:PORT", "ray://HOST:PORT").  -> the ray module."""
    ray = require_ray()
    if address not in (None, "local", "auto"):
        _probe(address)
    if ray.is_initialized():
        return ray
    quiet = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    try:
        if address in (None, "local"):  # logical CPUs: stages and tasks share the cores
            ray.init(num_cpus=max(num_cpus or 0, LOCAL_CPUS), object_store_memory=LOCAL_OBJECT_STORE,
                     **quiet)
        else:
            ray.init(address=address, **quiet)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "start a local Ray cluster" if address in (None, "local") else \
            f"reach the Ray cluster at {address!r}"
        raise RefimplError(f"--ray: cannot {where} ({first[:200]})") from None
    return ray


def _probe(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to HOST:PORT (or ray://HOST:PORT) first: Ray itself retries an
    unreachable address for minutes."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RefimplError(f"--ray {address!r}: not an address (HOST:PORT, ray://HOST:PORT, auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RefimplError(f"--ray: cannot reach the Ray cluster at {address!r} "
                           f"({e.strerror or type(e).__name__})") from None


class _Ref:
    """A result in flight, with the stage that computes it (to name it if it dies)."""

    __slots__ = ("ref", "stage")

    def __init__(self, ref, stage: int):
        self.ref, self.stage = ref, stage


class RayStages:
    """One Ray actor per stage (StageWorker): num_cpus=1 on CPU hosts, num_gpus=1 for device
    "gpu" (Ray gives each actor its own GPU).  `env`: more environment variables for the actors
    (e.g. PYTHONPATH where a device module given by name lives)."""

    def __init__(self, address: str | None = None, env: dict | None = None):
        self.address, self.env = address, dict(env or {})
        self.ray = None
        self.actors = []

    def start(self, source, plan, dtype, device, mla_form) -> list:
        self.ray = ray = connect(self.address, num_cpus=len(plan))
        self.plan = plan
        if not isinstance(device, str):  # an array module: each actor imports it by name
            device = f"module:{device.__name__}"
        res = {"num_gpus": 1} if device in ("gpu", "cuda") else {"num_cpus": 1}
        actor = ray.remote(StageWorker).options(
            **res, max_restarts=0, scheduling_strategy="SPREAD",  # one host or GPU per stage first
            runtime_env={"env_vars": {**blas_env(), **self.env}})
        self.actors = [actor.remote(source, spec, dtype, device, mla_form) for spec in plan]
        return list(range(len(plan)))

    def call(self, stage: int, method: str, *args, returns: int = 1):
        args = tuple(a.ref if isinstance(a, _Ref) else a for a in args)
        fn = getattr(self.actors[stage], method)
        if returns > 1:
            return tuple(_Ref(r, stage) for r in fn.options(num_returns=returns).remote(*args))
        return _Ref(fn.remote(*args), stage)

    def get(self, ref, plan=None):
        ray = self.ray
        try:
            return ray.get(ref.ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                ray.exceptions.ActorUnavailableError) as e:
            raise RefimplError(self._dead(ref.stage, e)) from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, RefimplError):
                raise RefimplError(str(cause)) from None
            if isinstance(cause, ray.exceptions.RayActorError):
                raise RefimplError(self._dead(ref.stage, cause)) from None
            first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise RefimplError(f"stage {ref.stage} failed: {first[:300]}") from None

    def _dead(self, stage: int, e) -> str:
        """The stage that died (the first one that no longer answers), in one line."""
        ray = self.ray
        for i, a in enumerate(self.actors):
            try:
                ray.get(a.ready.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - dead, unreachable or stuck: this is the one
                stage = i
                break
        spec = self.plan[stage]
        return (f"pipeline stage {stage} ({spec.describe()}) died mid-run "
                f"({type(e).__name__}); no output was written")

    def kill(self, stage: int) -> None:
        """End one stage's actor at once (what a lost host looks like; used by the tests)."""
        self.ray.kill(self.actors[stage], no_restart=True)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
