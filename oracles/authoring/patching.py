"""Replacing module attributes for the duration of a `with` block: how a mutant (mutants.py) or
an engine mode (modes.py) changes one function refimpl looks up."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def patched(replacements):
    """replacements: [(module_or_class, attribute, new_value)]; restored on exit (mutants.py)."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in replacements]
    try:
        for obj, name, value in replacements:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
