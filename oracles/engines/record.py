"""Observing an engine's module outputs without patching its source: an object's class is
swapped for a subclass whose __call__ records what the original returns (MLX modules, llama.cpp
has its own callback). The swap is undone by `restore`."""

from __future__ import annotations


def record_calls(obj, on_output) -> None:
    """After this, every obj(...) also calls on_output(output, *args)."""
    base = type(obj)

    def __call__(self, *args, **kwargs):
        out = base.__call__(self, *args, **kwargs)
        on_output(out, *args)
        return out

    obj.__class__ = type(f"Recorded{base.__name__}", (base,), {"__call__": __call__,
                                                                "_recorded_base": base})


def restore(obj) -> None:
    base = getattr(type(obj), "_recorded_base", None)
    if base is not None:
        obj.__class__ = base


def record_method(obj, method: str, on_output) -> None:
    """After this, every obj.method(...) also calls on_output(output, *args, **kwargs)."""
    base = type(obj)

    def wrapped(self, *args, **kwargs):
        out = getattr(base, method)(self, *args, **kwargs)
        on_output(out, *args, **kwargs)
        return out

    obj.__class__ = type(f"Recorded{base.__name__}", (base,), {method: wrapped,
                                                                "_recorded_base": base})
