"""Array module selection (numpy | cupy) and the dtype policy.

The math takes its array module from its inputs (`xp = array_module(x)`), so one code path runs on
numpy and on cupy. Everything that exists in only one of them lives here.
"""

from __future__ import annotations

import numpy as np

from .errors import RefimplError

DTYPES = {"float64": np.float64, "float32": np.float32}


def array_module(*arrays):
    """numpy, or the device array module of the first argument that is a device array: cupy
    for a cupy array, and for any other non-numpy array type the namespace it declares through
    the array API's `__array_namespace__` (tests/fakecupy.py, CuPy's rules on the CPU)."""
    for a in arrays:
        t = type(a)
        if t.__module__.startswith("cupy"):
            import cupy

            return cupy
        if hasattr(t, "__array_namespace__") and not issubclass(t, (np.ndarray, np.generic)):
            return a.__array_namespace__()
    return np


def device_module(device):
    """The array module for a device: "cpu" -> numpy, "gpu" (or "cuda") -> cupy, or an array
    module given itself (one whose arrays declare it as their `__array_namespace__`, copied to
    with `asarray` and back with `.get()`, as CuPy's are: tests/fakecupy.py)."""
    if not isinstance(device, str):
        if not (callable(getattr(device, "asarray", None)) and hasattr(device, "ndarray")):
            raise RefimplError(f"device {device!r} is not 'cpu', 'gpu' or an array module")
        return device
    if device == "cpu":
        return np
    if device in ("gpu", "cuda"):
        try:
            import cupy
        except ImportError:
            raise RefimplError("device 'gpu' needs cupy (pip install '.[gpu]')") from None
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # noqa: BLE001 - cupy raises its own runtime error types
            raise RefimplError(f"device 'gpu': no usable CUDA device ({e})") from None
        return cupy
    raise RefimplError(f"device {device!r} is not 'cpu' or 'gpu'")


def gpu_available() -> tuple[bool, str]:
    """(True, "") when cupy imports and sees a device, else (False, the reason)."""
    try:
        import cupy
    except ImportError as e:
        return False, f"cupy is not installed ({e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        return False, f"cupy sees no CUDA device ({e})"
    return (n > 0), ("" if n > 0 else "cupy sees no CUDA device")


def working_dtype(name) -> np.dtype:
    """float64 (the reference) or float32 (allowed for speed)."""
    if isinstance(name, np.dtype) or name in (np.float64, np.float32):
        name = np.dtype(name).name
    if name not in DTYPES:
        raise RefimplError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return np.dtype(DTYPES[name])


def to_numpy(x) -> np.ndarray:
    """A host numpy array, whichever module holds x: the one explicit device-to-host copy."""
    if array_module(x) is not np:
        return x.get()
    return np.asarray(x)


def device_name(device) -> str:
    """"cpu", "gpu", or the name of an array module given as the device."""
    return device if isinstance(device, str) else getattr(device, "__name__", repr(device))


def stable_argsort(x, axis=-1):
    """argsort that keeps equal values in index order (numpy needs kind="stable"; cupy's radix
    sort is always stable and takes no kind)."""
    xp = array_module(x)
    if xp is np:
        return np.argsort(x, axis=axis, kind="stable")
    return xp.argsort(x, axis=axis)
