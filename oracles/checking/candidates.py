"""Candidates: what the checker compares with a golden suite.  A directory of output files
(the file route, for engines in any language, read as untrusted input: format/candidate.py) or a
Python adapter loaded from `--adapter pkg.mod:factory`, run in this process with every call on a
worker thread with a timeout (worker.py), or in a process of its own (isolated.py, the command
line's default).

An adapter is any object with
    supports(case) -> True, or a string saying why not (the case is skipped with that reason)
    run(case)      -> {output name: array}   (numpy, or anything np.asarray / torch accepts)
and optionally
    close()        -> None: release the engine (its threads, GPU context, server). Called once,
                      after the last case, on the thread and in the process that built the adapter
                      (AdapterCandidate.close, isolated.ChildCandidate.close), before the process
                      ends; a close() that raises is a warning, not a verdict.
where `case` has .id, .kind, .params, .inputs (numpy arrays as stored), .config (refimpl Config or
None), .weights (model cases: the checkpoint tensors) and .path (the case directory, holding
config.json and model.safetensors for model cases).

Scenario cases (kinds `schedule` and `mtp_speculation`, oracles/authoring/scenarios.py) also have
.schedule (= .params["schedule"]; None for every other case): how the engine must run the
requests, e.g. for `schedule`

    {"format": 1, "requests": 2, "prompt_lengths": [25, 27], "steps": [
        {"op": "forward", "batch": [[0, 20]]},                          # one forward: request 0's next 20 tokens
        {"op": "share_prefix", "request": 1, "from": 0, "length": 20},  # request 1 reuses those 20 cache entries
        {"op": "forward", "batch": [[0, 5], [1, 7]]},                   # one batch: 5 more of 0, 7 of 1
        {"op": "forward", "batch": [[1, 1]], "repeat": 3},              # three decode steps of request 1
        {"op": "preempt", "request": 1},                                # request 1's cache freed ...
        {"op": "forward", "batch": [[1, 1]]}]}                          # ... and recomputed before its next token

with request r's tokens in .inputs["request.<r>.input_ids"] [1, n_r], and outputs named
request.<r>.logits (required) and request.<r>.<trace name> over the positions the schedule
computes for r. An engine that cannot run a schedule as written returns a reason from
supports(case) (the case is skipped, never passed); running the requests some other way would
not test the path the case is for. oracles.format.schedule.plan(schedule, lengths) checks a
schedule and unrolls it into typed steps (docs/conformance.md section 9).

An adapter may also have close(): it frees the engine; when present it is called once, after the
last case, on the thread that built the adapter.
"""

from __future__ import annotations

import importlib
import os
import weakref

import ml_dtypes
import numpy as np

from refimpl.layout import DTYPE_NAMES
from refimpl.writer import write_safetensors_planned

from .. import OraclesError
from ..format import candidate as candidate_files
from ..format.golden import Golden
from ..format.schema import matches
from .worker import (DEFAULT_CASE_TIMEOUT, AdapterTimeout, CaseError, Worker, call_adapter,
                     check_timeout, split_spec, text)


class DirCandidate:
    """The file route: CANDIDATE/cases/<id>/outputs.safetensors, skip.txt or error.txt, read as
    untrusted input (format/candidate.py: regular files inside CANDIDATE, bounded reads, the
    outputs read lazily, only the tensors the case compares)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise OraclesError(f"{self.path}: candidate directory not found")
        self.label = self.path

    def supports(self, case_id, load):
        """True, or the reason in CANDIDATE/cases/<id>/skip.txt (an engine that cannot run the
        case, e.g. cannot express its schedule, says so there): its first line, printable
        characters only, at most 200. An error.txt beside it wins (the case is an ERROR)."""
        if candidate_files.error_reason(self.path, case_id) is not None:
            return True
        return candidate_files.skip_reason(self.path, case_id)

    def outputs(self, case_id, load):
        err = candidate_files.error_reason(self.path, case_id)
        if err is not None:
            raise CaseError(err)
        return candidate_files.outputs(self.path, case_id)


def _supported(ok):
    """supports()'s answer -> True, or the reason to skip (on the adapter's thread: any
    __bool__ or __str__ it runs is the adapter's)."""
    if ok is True or (isinstance(ok, np.bool_) and bool(ok)):
        return True
    return text(ok) if ok else "not supported"


class AdapterCandidate:
    """A Python engine: `factory()` returns an object with supports(case) and run(case). Every
    call runs on one worker thread with a per-call timeout (`timeout` seconds; 0 runs calls
    inline in the calling thread, without a timeout)."""

    def __init__(self, adapter, label: str, timeout: float = DEFAULT_CASE_TIMEOUT, worker=None):
        self.adapter, self.label, self.timeout = adapter, label, timeout
        self.worker = worker if worker is not None or not timeout else Worker()
        if self.worker is not None:  # its thread ends with the candidate (unless it is stuck)
            weakref.finalize(self, self.worker.close)

    @property
    def stuck(self):
        return self.worker.stuck if self.worker is not None else None

    def close(self, abort: bool = False) -> str | None:
        """The adapter's optional close() (the adapter protocol: release the engine), called
        on the thread that built it, then that thread ended and waited for. -> None, or the
        one-line reason close() failed. abort (after Ctrl-C, while a call may still run on the
        worker): nothing is called and nothing waited for."""
        close, why = getattr(self.adapter, "close", None), None
        self.adapter = None
        if not abort and callable(close) and not self.stuck:
            try:
                self._call(close, "close()")
            except CaseError as e:
                why = str(e)
        if self.worker is not None:
            self.worker.close(wait=0 if abort else 10.0)
        return why

    def _call(self, fn, what):
        return call_adapter(self.worker, fn, self.timeout, what)

    def supports(self, case_id, load):
        case, adapter = load(), self.adapter
        return self._call(lambda: _supported(adapter.supports(case)), "supports()")

    def outputs(self, case_id, load):
        case, adapter = load(), self.adapter
        out = self._call(lambda: _as_outputs(adapter.run(case)), "run()")
        for k, v in out.items():
            if not isinstance(k, str):
                raise CaseError(f"run() returned an output named {k!r}, not a string")
            if v.dtype.kind not in "biuf" and v.dtype != ml_dtypes.bfloat16:
                raise CaseError(f"run() returned output {k!r} as {v.dtype} values, not numbers")
        return out


def _as_outputs(out):
    """run()'s result -> {name: numpy array} (on the adapter's thread: torch calls stay there)."""
    if not isinstance(out, dict):
        raise TypeError(f"run() returned {type(out).__name__}, not a dict of arrays")
    res = {}
    for k, v in out.items():
        try:
            res[k] = _as_numpy(v)
        except Exception as e:  # noqa: BLE001 - a value that is no array
            raise TypeError(f"output {k!r}: {type(v).__name__} is not an array ({e})") from None
    return res


def _as_numpy(v):
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def adapter_factory(spec: str):
    """'pkg.mod:factory' -> a function that imports the module and calls its factory (wherever
    the candidate runs it: its worker thread, or the adapter process). Whatever goes wrong in
    the import is one OraclesError naming the spec."""
    mod_name, attr = split_spec(spec)

    def factory():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise OraclesError(f"--adapter {spec}: cannot import {mod_name} ({e})") from None
        except BaseException as e:  # noqa: BLE001 - anything the module does at import
            if isinstance(e, KeyboardInterrupt):
                raise
            raise OraclesError(f"--adapter {spec}: importing {mod_name} raised "
                               f"{type(e).__name__}: {text(e)}") from None
        f = getattr(mod, attr, None)
        if f is None or not callable(f):
            raise OraclesError(f"--adapter {spec}: {mod_name} has no callable {attr}")
        return f()

    return factory


def load_adapter(spec: str, timeout: float = DEFAULT_CASE_TIMEOUT) -> AdapterCandidate:
    """'pkg.mod:factory' -> the candidate, in this process (factory() is called once). The
    import and the factory run on the candidate's worker thread with the same timeout as each
    case; whatever goes wrong there (an exception, sys.exit, no return) is one line and exit 2.
    isolated.ChildCandidate runs the same in a child process (the command line's default)."""
    return make_candidate(adapter_factory(spec), spec, timeout)


def build_adapter(factory, label: str):
    """factory() -> the adapter, checked to have supports(case) and run(case); an exception or
    sys.exit in the factory is one OraclesError naming `label` (KeyboardInterrupt propagates)."""
    try:
        adapter = factory()
    except OraclesError:
        raise
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        raise OraclesError(f"{label}: the factory raised {type(e).__name__}: {text(e)}") from None
    if not (callable(getattr(adapter, "supports", None)) and callable(getattr(adapter, "run", None))):
        raise OraclesError(f"{label}: the factory's object needs supports(case) and run(case)")
    return adapter


def make_candidate(factory, label: str, timeout: float = DEFAULT_CASE_TIMEOUT) -> AdapterCandidate:
    """factory() -> an adapter, called on the candidate's worker thread (where every later call
    runs, so an engine built there keeps its thread) with the case timeout -> the candidate.
    An exception, sys.exit or no return in the factory is one line and exit 2 naming `label`."""
    timeout = check_timeout(timeout)
    worker = Worker() if timeout else None
    try:
        adapter = worker.call(lambda: build_adapter(factory, label), timeout, "the factory") \
            if worker is not None else build_adapter(factory, label)
    except AdapterTimeout:
        raise OraclesError(f"{label}: building the adapter did not return within {timeout:g} s "
                           "(--case-timeout)") from None
    return AdapterCandidate(adapter, label, timeout=timeout, worker=worker)


def run_mode(cand, info: dict | None) -> str | None:
    """The mode the candidate ran in (the profile that emulates it, format/profiles.py): its
    engine.json's or its built-in engine's (`info`), else the adapter's `mode` attribute
    (reported by an adapter process, or read in this process), else None. Read once the adapter
    is built; `oracles check`, `oracles search` and the pytest plugin choose the profile by it
    (profiles.choose)."""
    mode = info.get("mode") if info else None
    if mode is None:
        mode = getattr(cand, "mode", None)
    if mode is None:
        mode = getattr(getattr(cand, "adapter", None), "mode", None)
    return mode if isinstance(mode, str) else None


def _remove(path: str) -> None:
    """An earlier run's file of a case, gone (nothing when there is none)."""
    if os.path.lexists(path):
        os.remove(path)


def write_outputs(golden_path: str, candidate, out: str, only=None,
                  errors: dict | None = None, expect_digest: str | None = None,
                  checkpoint: str | None = None) -> dict:
    """The file route driven by an adapter: CANDIDATE/cases/<id>/outputs.safetensors for every
    supported case -> {case id: skip reason} for the others. A case whose adapter call fails
    (raises, exits, times out, its process dies) gets CANDIDATE/cases/<id>/error.txt
    (format/candidate.py: one line, the reason) instead of outputs, and its reason goes to
    `errors`. Outputs are written one tensor at a time (a lazily read format.candidate.Outputs
    from an adapter process is never held whole). Written into a candidate of an earlier run
    (the engine matrix reuses its work directory), a case keeps only what this run wrote: the
    other file is removed."""
    golden = Golden(golden_path, expect_digest=expect_digest, checkpoint=checkpoint)
    if hasattr(candidate, "bind"):  # an adapter process: the same suite, the cases in this order
        candidate.bind(golden, [cid for cid in golden.cases if matches(cid, only)])
    skipped = {}
    errors = {} if errors is None else errors
    for cid in golden.cases:
        if not matches(cid, only):
            continue
        if candidate.stuck:
            errors[cid] = f"not run: the adapter is stuck ({candidate.stuck})"
            continue
        cache = {}

        def load(cid=cid):
            if "case" not in cache:
                cache["case"] = golden.load_case(cid)
            return cache["case"]
        d = os.path.join(out, "cases", cid)
        try:
            ok = candidate.supports(cid, load)
            if ok is not True:
                skipped[cid] = ok
                _remove(os.path.join(d, candidate_files.OUTPUTS_FILE))
                _remove(os.path.join(d, candidate_files.ERROR_FILE))
                continue
            outs = candidate.outputs(cid, load)
            entries = [(k, DTYPE_NAMES.get(np.dtype(v.dtype)), tuple(v.shape)) for k, v in outs.items()]
            bad = [k for k, dt, _ in entries if dt is None]
            if bad:
                raise CaseError(f"run() returned output {bad[0]!r} as {outs[bad[0]].dtype} values, "
                                "which safetensors cannot store")
        except CaseError as e:  # recorded per case: check reports it as ERROR, not missing
            errors[cid] = str(e)
            candidate_files.write_error(d, e)
            _remove(os.path.join(d, candidate_files.OUTPUTS_FILE))
            continue
        os.makedirs(d, exist_ok=True)
        write_safetensors_planned(os.path.join(d, candidate_files.OUTPUTS_FILE), entries,
                                  lambda k: np.asarray(outs[k]))
        _remove(os.path.join(d, candidate_files.ERROR_FILE))
    return skipped
