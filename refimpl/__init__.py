"""refimpl: the DeepSeek-V3 architecture as plain NumPy/CuPy array code, exact in float64.

    import refimpl
    cfg = refimpl.Config.preset("tiny")
    model = refimpl.load("checkpoint_dir")          # lazy, mmap-backed
    logits = model.forward(tokens)                  # int [batch, seq] -> [batch, seq, vocab]
    cache = model.new_cache(batch=1, max_len=4096)  # latent cache: c_kv + k_rope per layer
"""

from .config import Config, RopeScaling
from .errors import CheckpointError, ConfigError, InputError, RefimplError

__version__ = "0.1.0"


def __getattr__(name):
    """Model, LatentCache and load import the forward pass (model.py, layer.py) on first use, so
    that `import refimpl.config` (or oracles' checker) does not."""
    if name == "Model":
        from . import model
        return model.Model
    if name == "load":  # one process, or pipeline stages (loader.py)
        from . import loader
        return loader.load
    if name == "LatentCache":
        from . import layer
        return layer.LatentCache
    raise AttributeError(f"module 'refimpl' has no attribute {name!r}")


__all__ = ["Config", "RopeScaling", "Model", "LatentCache", "load", "RefimplError", "ConfigError",
           "CheckpointError", "InputError", "__version__"]
