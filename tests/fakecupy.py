"""A CPU stand-in for CuPy: device arrays that keep CuPy's rule that host memory is never used
implicitly, so that the test suite proves, without a GPU, that refimpl moves data between host
and device only where it says so - and counts every such move.

    import tests.fakecupy as fcp
    model = refimpl.load(path, device=fcp)        # weights, cache and activations on the "device"
    fcp.transfers.reset(); model.forward(tokens); fcp.transfers.summary()

What it does as CuPy does (cupy/_core/core.pyx, read at cupy commit 6b6d9563c):
- `np.asarray(x)` / `np.array(x)` on a device array raises TypeError (`ndarray.__array__`,
  core.pyx:1803): copies to the host are `x.get()` or `asnumpy(x)`;
- numpy ufuncs and functions applied to device arrays run on the device and return device arrays
  (`__array_ufunc__`, core.pyx:1969; `__array_function__`, core.pyx:2028); a numpy array among
  their inputs raises TypeError (CuPy refuses implicit host-to-device copies);
- reductions return 0-d device arrays, not Python or numpy scalars;
- `asarray(host array)` is the host-to-device copy.

Where it is STRICTER than CuPy, on purpose (each is an implicit device-to-host copy and a
synchronisation on a real GPU, which CuPy allows silently): `float(x)`, `int(x)`, `bool(x)`,
`x.tolist()`, `x.item()`, `x.tobytes()`, `operator.index(x)`, pickling (CuPy's `__reduce__` calls
`get()`, core.pyx:1540), and a numpy array used as an index or assigned into a device array (CuPy
converts those implicitly).  All raise TypeError here, so every transfer in refimpl is an explicit
`asarray`/`get` and shows up in `transfers`.

Memory is numpy's: a device array wraps a numpy array that only this module touches.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as _np

__all__ = ["ndarray", "asarray", "array", "asnumpy", "transfers", "ImplicitTransfer"]


class ImplicitTransfer(TypeError):
    """A device array would have been copied to (or from) the host without being asked."""


@dataclass
class Transfers:
    """Counts of explicit copies, by direction; `sites` names the refimpl function that asked."""

    to_device: int = 0
    to_device_bytes: int = 0
    to_host: int = 0
    to_host_bytes: int = 0
    sites: Counter = field(default_factory=Counter)

    def reset(self) -> None:
        self.to_device = self.to_device_bytes = self.to_host = self.to_host_bytes = 0
        self.sites = Counter()

    def record(self, direction: str, nbytes: int) -> None:
        if direction == "to_device":
            self.to_device += 1
            self.to_device_bytes += nbytes
        else:
            self.to_host += 1
            self.to_host_bytes += nbytes
        self.sites[(direction, _caller())] += 1

    def summary(self) -> dict:
        return {"to_device": self.to_device, "to_device_bytes": self.to_device_bytes,
                "to_host": self.to_host, "to_host_bytes": self.to_host_bytes,
                "sites": {f"{d} {s}": n for (d, s), n in sorted(self.sites.items())}}


def _caller() -> str:
    """module.function of the first frame outside this file and refimpl.backend."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename == __file__
                             or f.f_globals.get("__name__") == "refimpl.backend"):
        f = f.f_back
    if f is None:
        return "?"
    return f"{f.f_globals.get('__name__', '?')}.{f.f_code.co_name}"


transfers = Transfers()


def _refuse(what: str):
    raise ImplicitTransfer(f"{what}: an implicit transfer between host and device (use "
                           "xp.asarray(...) to copy to the device, .get() to copy to the host)")


def _unwrap(x):
    """Device arrays -> their numpy arrays; scalars, dtypes, slices pass; host arrays raise."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        _refuse(f"a numpy array of shape {list(x.shape)} used with device arrays")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(r, out=None):
    if out is not None and r is out[1]:
        return out[0]
    if isinstance(r, _np.ndarray):
        return ndarray(r)
    if isinstance(r, _np.generic):  # CuPy's reductions give 0-d device arrays
        return ndarray(_np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _call(fn, args, kwargs):
    out = kwargs.get("out")
    pair = None
    if isinstance(out, ndarray):
        pair = (out, out._a)
    elif isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], ndarray):
        pair = (out[0], out[0]._a)
    args = _unwrap(list(args))
    kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
    return _wrap(fn(*args, **kwargs), pair)


_BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
           "lshift", "rshift")
_COMPARE = ("lt", "le", "eq", "ne", "gt", "ge")
_BLOCKED = {"tolist", "item", "tobytes", "tofile", "dump", "dumps", "data", "ctypes", "itemset",
            "view"}


class ndarray:
    """A device array: numpy's operations, none of numpy's implicit host access."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a):
        if not isinstance(a, _np.ndarray):
            raise TypeError("fakecupy.ndarray wraps a numpy array (make one with asarray)")
        self._a = a

    # ---- what the array API asks for ---------------------------------------------------------
    def __array_namespace__(self, api_version=None):
        return sys.modules[__name__]

    # ---- implicit host access: refused ------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        _refuse("np.asarray / np.array of a device array")

    def __float__(self):
        _refuse("float() of a device array")

    def __int__(self):
        _refuse("int() of a device array")

    def __complex__(self):
        _refuse("complex() of a device array")

    def __bool__(self):
        _refuse("bool() of a device array (an `if` or `assert` on device values)")

    def __index__(self):
        _refuse("a device array used as a Python integer")

    def __reduce__(self):
        _refuse("pickling a device array (sending it to another process)")

    def __repr__(self):
        return f"fakecupy.ndarray(shape={self.shape}, dtype={self.dtype})"

    # ---- explicit copies ----------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None):
        """The host copy (CuPy's ndarray.get): counted."""
        transfers.record("to_host", self._a.nbytes)
        h = _np.array(self._a, order=order)
        if out is not None:
            _np.copyto(out, h)
            return out
        return h

    # ---- metadata -----------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    @property
    def base(self):
        return None if self._a.base is None else ndarray(_np.asarray(self._a.base))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(_np.asarray(v)) for v in self._a)

    def __getattr__(self, name):
        """The remaining ndarray methods (reshape, astype, sum, max, transpose, ...), run on the
        device; dunder lookups (numpy's __array_interface__ probing) and host-access methods are
        refused."""
        if name.startswith("__") or name in _BLOCKED:
            if name in _BLOCKED:
                _refuse(f"ndarray.{name} of a device array")
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)
        return lambda *a, **k: _call(attr, a, k)

    # ---- indexing -----------------------------------------------------------------------------
    @staticmethod
    def _index(key):
        if isinstance(key, tuple):
            return tuple(ndarray._index(k) for k in key)
        if isinstance(key, ndarray):
            return key._a
        if isinstance(key, (_np.ndarray, list)):
            _refuse("a host array or list used to index a device array")
        return key

    def __getitem__(self, key):
        return _wrap(self._a[self._index(key)])

    def __setitem__(self, key, value):
        self._a[self._index(key)] = _unwrap(value)

    # ---- numpy dispatch, as CuPy does it -----------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _call(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return _call(func, args, kwargs)


def _binary(op):
    def forward(self, other):
        return _call(getattr(_np.ndarray, f"__{op}__"), (self, other), {})

    def reflected(self, other):
        return _call(getattr(_np.ndarray, f"__r{op}__"), (self, other), {})

    def inplace(self, other):
        getattr(self._a, f"__i{op}__")(_unwrap(other))
        return self
    return forward, reflected, inplace


for _op in _BINARY:
    _f, _r, _i = _binary(_op)
    setattr(ndarray, f"__{_op}__", _f)
    setattr(ndarray, f"__r{_op}__", _r)
    setattr(ndarray, f"__i{_op}__", _i)
for _op in _COMPARE:
    setattr(ndarray, f"__{_op}__",
            (lambda name: lambda self, other: _call(getattr(_np.ndarray, name), (self, other), {}))(
                f"__{_op}__"))
for _op in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_op}__",
            (lambda name: lambda self: _wrap(getattr(self._a, name)()))(f"__{_op}__"))
ndarray.__hash__ = None


# ---- the module's functions -------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    """A device array: `a` itself (cast) when it is one, else a counted host-to-device copy."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == _np.dtype(dtype) else a.astype(dtype)
    h = _np.array(a, dtype=dtype, order=order or "K")
    transfers.record("to_device", h.nbytes)
    return ndarray(h)


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return ndarray(_np.array(a._a, dtype=dtype, copy=copy, order=order))
    return asarray(a, dtype, order)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray):
        return ndarray(_np.ascontiguousarray(a._a, dtype=dtype))
    return asarray(_np.ascontiguousarray(a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    """The host copy (cupy.asnumpy): counted when `a` is a device array."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def argsort(a, axis=-1):
    """Stable, as CuPy's radix sort is (and it takes no `kind`)."""
    return _call(_np.argsort, (a,), {"axis": axis, "kind": "stable"})


def __getattr__(name):
    """numpy's other names: types and constants as they are, functions run on the device."""
    attr = getattr(_np, name)
    if isinstance(attr, type) or not callable(attr):
        return attr
    if name in ("promote_types", "result_type", "dtype", "finfo", "iinfo", "can_cast"):
        return attr
    return lambda *a, **k: _call(attr, a, k)
