"""Adapters in a child process: the default for `--adapter` and `--engine` (`--in-process` for
debugging runs them in the checker's own process, on a worker thread: candidates.AdapterCandidate).

The checker judges in the parent; the adapter (its import, its factory, every supports(case) and
run(case), and its optional close()) runs in a child, `python -m oracles.checking.isolated`,
started in a session of its own. The engine is built once per child, on the child's main thread,
and every later call runs on that same thread. The parent can always stop the child: a call that
does not return within --case-timeout seconds, whatever the child holds (the interpreter lock, a
C loop, threads of its own), ends with SIGKILL to the child's process group. A child that
crashes, is killed by a signal or exits during a call makes that case an ERROR naming the cause,
and the next case starts a fresh child (building the engine again); a child that cannot be
restarted leaves the remaining cases ERROR (not run).

Nothing the child sends is unpickled. Requests and replies are length-prefixed strict JSON
(refimpl.jsonfile) of at most MAX_MESSAGE bytes; the parent checks every reply's fields.
Outputs go through a file: the child writes run()'s arrays as one safetensors file in a private
temporary directory of the parent's, and the parent opens it like any candidate's outputs
(format.candidate.Outputs: header checked, tensors read only when compared) and removes it at
once. The child reads the case itself from the suite (format.golden.Golden on the same
directory, pinned to the digest the parent verified, and only while the case's files are still
the ones the parent verified: Golden.file's identity check).

The child's standard output goes to the parent's standard error, so nothing an adapter prints
can forge a line of the report; its standard input is /dev/null. It ends with os._exit after
close(): engines whose threads or C++ destructors abort at interpreter exit (MLX's `terminate
called without an active exception`) cannot change the checker's exit code.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import weakref

import ml_dtypes

from refimpl import jsonfile
from refimpl.writer import write_safetensors

from .. import OraclesError
from ..format.candidate import Outputs
from ..format.golden import Golden
from . import spawn
from .candidates import _as_outputs, _supported, adapter_factory, build_adapter
from .worker import CaseError, check_timeout
from .worker import text as _text

PROTOCOL = 1
MAX_MESSAGE = 1 << 20  # bytes of one reply; the child cuts its texts far below this
CLOSE_WAIT = 10.0  # seconds a child has to exit after close() returned
READY_WAIT = 120.0  # seconds (at least) for a fresh interpreter to start, before the factory's timeout


class _Timeout(Exception):
    pass


class _Gone(Exception):
    pass


def _frame(obj) -> bytes:
    data = json.dumps(obj, allow_nan=False).encode("utf-8")
    return struct.pack(">I", len(data)) + data


def _cause(returncode) -> str:
    """How a child ended, in words."""
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _kill(proc, tmp) -> None:
    """The child killed (spawn.kill), the temporary directory removed. Safe to call twice."""
    spawn.kill(proc)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


class ChildCandidate:
    """An adapter built in a child process by `factory` ("pkg.mod:function", called with the
    JSON values `args`: `--adapter pkg.mod:factory` is ("pkg.mod:factory", []), `--engine NAME`
    ("oracles.engines:engine_adapter", [NAME, options])), with a per-call timeout (0: none).
    An adapter with an `info` dict (a built-in engine's engine, version and options) is
    labelled `label_of(info)`. restart_after_timeout=False (oracles search): a call that timed
    out leaves the candidate `stuck`, as the in-process worker does, rather than restarting it.

    The child is started, and asked to build the adapter, when the candidate is made; the reply
    is awaited at the first call (or when `label` or `info` is read), so that the child starts
    while the checker reads the suite. A factory that fails is one OraclesError (exit 2). `info`
    holds the engine's name, version and options (None for --adapter).

    Cases are pipelined: once a case's outputs are back (or it is skipped), the next case of the
    order given to `bind` is sent, so that the child runs it while the checker judges this one.
    The child still makes every call in order on one thread; a call's timeout counts from when
    it was sent (supports) or from when supports' answer was read (run): never shorter than
    --case-timeout."""

    def __init__(self, factory: str, args: list, label: str, timeout: float = 600.0, label_of=None,
                 process=None, restart_after_timeout: bool = True):
        self.spec, self._label, self.timeout = {"factory": factory, "args": args}, label, check_timeout(timeout)
        self._restart_after_timeout = restart_after_timeout  # False: a timeout leaves it stuck
        self._label_of = label_of
        self._prespawned = process  # a spawn.ChildProcess started earlier (oracles/__main__.py)
        self._info = self._mode = None
        self.stuck = None  # why no further call is made (a restart failed)
        self.golden, self._order = None, []  # the suite being checked, its cases in order (bind)
        self._proc = self._to = self._from = None
        self._starting = False  # a start request is out, its replies not read yet
        self._pending = None  # the case request out: {case, stage, since, out}
        self._n = 0
        self._tmp = tempfile.mkdtemp(prefix="oracles-adapter-")
        self._state = {"proc": None}
        self._finalizer = weakref.finalize(self, lambda st, tmp: _kill(st["proc"], tmp),
                                           self._state, self._tmp)
        try:
            self._spawn()
        except BaseException:
            self.close(abort=True)
            raise

    @property
    def label(self) -> str:
        self._started(first=True)
        return self._label

    @label.setter
    def label(self, value: str) -> None:
        self._label = value

    @property
    def info(self):
        self._started(first=True)
        return self._info

    @property
    def mode(self):
        """The adapter's `mode` (the profile that emulates its run: RefimplAdapter, a built-in
        engine), reported by the child when the adapter was built; None if it has none."""
        self._started(first=True)
        return self._mode

    # ---- the candidate interface (check.run_check, adapters.write_outputs) ----------------------
    def bind(self, golden, order=()) -> None:
        """The suite the cases come from, and the order in which they will be asked for. The
        child opens the same directory, pinned to the digest of the manifest the checker
        verified, and reads a case's files only while they are the files the checker verified
        (device, inode, size, mtime: Golden.file)."""
        self.golden, self._order = golden, list(order)

    def supports(self, case_id, load):
        p = self._pending
        if p is None or p["case"] != case_id or p["stage"] != "supports":
            self._discard()
            self._submit(case_id, raise_errors=True)
            p = self._pending
        try:
            v = self._reply("supports()", p["since"])
            if "error" in v:
                raise CaseError(v["error"])
            if "value" not in v or not (v["value"] is True or isinstance(v["value"], str)):
                self._broken("supports()", "a reply without a verdict")
        except CaseError:
            self._pending = None
            self._prefetch(case_id)
            raise
        if v["value"] is True:
            p.update(stage="run", since=time.monotonic())
            return True
        self._pending = None
        self._prefetch(case_id)
        return v["value"] or "not supported"

    def outputs(self, case_id, load):
        p = self._pending
        if p is None or p["case"] != case_id or p["stage"] != "run":
            if self.supports(case_id, load) is not True:  # out of protocol order: ask again
                raise CaseError("run() was asked for a case that supports() declined")
            p = self._pending
        self._pending = None
        try:
            v = self._reply("run()", p["since"])
            if "error" in v:
                raise CaseError(v["error"])
            try:
                out = Outputs(p["out"], f"run()'s outputs for case {case_id!r}", unlink=True)
            except OraclesError as e:
                raise CaseError(f"run(): its outputs could not be read back ({e})") from None
        finally:
            self._prefetch(case_id)
        return out

    def close(self, abort: bool = False) -> str | None:
        """Ask the child to call the adapter's close() and exit (abort, or a case still in
        flight: kill it) -> None, or the one-line reason close() failed."""
        why = None
        if self._pending is not None:
            abort = True
        if self._proc is not None and self._proc.poll() is None and not abort:
            try:
                self._started()
                self._send({"op": "close"})
                why = self._reply("close()", time.monotonic()).get("error")
                if self._proc is not None:
                    self._proc.wait(CLOSE_WAIT)
            except (CaseError, OraclesError) as e:
                why = str(e)
            except subprocess.TimeoutExpired:
                why = f"the adapter process did not exit within {CLOSE_WAIT:g} s of close()"
        self._stop()
        self._finalizer()
        return why

    # ---- requests --------------------------------------------------------------------------------
    def _submit(self, case_id, raise_errors: bool = False) -> None:
        """Send the case's request (the child answers supports, then, if supported, runs it and
        answers again). A child is started first if none runs; a failure to start is raised
        (raise_errors) or left for the call that waits for this case (a prefetch)."""
        try:
            self._ensure()
            if self.golden is None:
                raise OraclesError("ChildCandidate: bind(golden) was not called before a case")
            g = self.golden
            ids = {n: list(v) for (cid, n), v in getattr(g, "_identity", {}).items() if cid == case_id}
            self._n += 1
            out = os.path.join(self._tmp, f"outputs-{self._n}.safetensors")
            ckpt = getattr(g, "checkpoint", None)
            self._send({"op": "case", "case": case_id, "out": out, "golden": {
                "path": os.path.abspath(g.path), "digest": g.digest, "verified": ids,
                "checkpoint": os.path.abspath(ckpt) if ckpt else None}})
            self._pending = {"case": case_id, "stage": "supports", "since": time.monotonic(), "out": out}
        except CaseError:
            self._pending = None
            if raise_errors:
                raise

    def _prefetch(self, case_id) -> None:
        """The next case of the order, sent now (the child runs it while this one is judged)."""
        try:
            nxt = self._order[self._order.index(case_id) + 1]
        except (ValueError, IndexError):
            return
        if self._pending is None and not self.stuck:
            self._submit(nxt)

    def _discard(self) -> None:
        """A case request out that is not the one asked for: the child is stopped (its work is
        not wanted, and its replies would come first); the next request starts a fresh one."""
        if self._pending is not None:
            self._pending = None
            self._stop()

    # ---- the child's life ----------------------------------------------------------------------
    def _spawn(self) -> None:
        """Start a child (or take the one started for this command) and send it the start
        request (its replies are read by _started)."""
        child, self._prespawned = self._prespawned, None
        if child is None or not child.alive():
            try:
                child = spawn.ChildProcess()
            except OSError as e:
                raise OraclesError(f"{self._label}: cannot start the adapter process ({e.strerror})") from None
        self._proc, self._to, self._from = child.proc, child.to, child.frm
        self._state["proc"] = self._proc
        self._spawned_at = child.started_at
        self._send({"op": "start", "protocol": PROTOCOL, "spec": self.spec, "label": self._label,
                    "sys_path": [p for p in sys.path if isinstance(p, str)]})
        self._starting = True

    def _started(self, first: bool = False) -> None:
        """Read the start request's replies (the child's greeting, then the factory's result):
        the interpreter gets READY_WAIT seconds (or the case timeout, if longer) to start, the
        factory the case timeout. A failure: OraclesError naming the adapter (first=True: the
        factory of the command's adapter; exit 2), CaseError otherwise (a restart)."""
        if not self._starting:
            return
        self._starting = False
        what = "the factory"
        try:
            wait = None if not self.timeout else max(self.timeout, READY_WAIT)
            ready = self._reply("starting the adapter process", self._spawned_at, wait)
            if ready.get("ready") != PROTOCOL:
                self._broken("starting the adapter process", "a greeting of another protocol")
            reply = self._reply(what, time.monotonic())
            if "error" in reply:
                self._stop()
                raise OraclesError(reply["error"])
            mode = reply.get("mode")
            self._mode = mode if isinstance(mode, str) else None
            info = reply.get("info")
            if info is not None:
                if not (isinstance(info, dict) and isinstance(info.get("engine"), str)
                        and isinstance(info.get("version"), str) and isinstance(info.get("options"), dict)):
                    self._broken(what, "engine info that is not {engine, version, options}")
                if not isinstance(info.get("serving", ""), str):
                    self._broken(what, "engine info whose `serving` is not a string")
                self._info = {"engine": info["engine"], "version": info["version"],
                              "options": info["options"],
                              **({"serving": info["serving"]} if "serving" in info else {})}
                if "mode" in info:  # (a built-in engine's: the profile that emulates it)
                    self._info["mode"] = info["mode"] if isinstance(info["mode"], str) else None
                if self._label_of is not None:
                    self._label = self._label_of(self._info)
        except CaseError as e:
            if first:
                raise OraclesError(f"{self._label}: {e}") from None
            raise

    def _stop(self) -> None:
        """Kill the child (if any) and forget it; the next request starts a fresh one."""
        for fd in (self._to, self._from):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to = self._from = None
        _kill(self._proc, None)
        self._proc = None
        self._state["proc"] = None
        self._starting = False

    def _ensure(self) -> None:
        """A child with its adapter built: the first one's factory awaited, or a fresh one
        started after a crash or a timeout (if that fails, every later case is not run)."""
        if self._starting:  # the command's own adapter (a restart is awaited below): exit 2
            self._started(first=True)
        if self._proc is not None:
            return
        if self.stuck:
            raise CaseError(f"not run: {self.stuck}")
        try:
            self._spawn()
            self._started()
        except (OraclesError, CaseError) as e:
            self._stop()
            self.stuck = f"the adapter could not be restarted: {_text(e, 500)}"
            raise CaseError(f"not run: {self.stuck}") from None

    def _send(self, msg: dict) -> None:
        try:
            os.write(self._to, _frame(msg))
        except (BrokenPipeError, TypeError):  # the child is gone (TypeError: no pipe any more)
            rc = self._reap()
            self._stop()
            raise CaseError(f"the adapter process {_cause(rc)}") from None

    def _reply(self, what: str, since: float, timeout: float | None = -1) -> dict:
        """The next reply, within `timeout` seconds of `since` (default: the case timeout; None:
        no limit) -> it, checked to be an object. A reply that does not come in time, a child
        that ends, a malformed reply: the child is killed and CaseError says why.
        KeyboardInterrupt raised by the adapter is raised here."""
        timeout = (self.timeout or None) if timeout == -1 else timeout
        deadline = since + timeout if timeout else None
        try:
            if self._from is None:
                raise _Gone
            (n,) = struct.unpack(">I", self._read(4, deadline))
            if n > MAX_MESSAGE:
                self._broken(what, f"a reply of {n:,} bytes")
            reply = jsonfile.loads(self._read(n, deadline), "its reply", OraclesError)
        except _Timeout:
            self._stop()
            if not self._restart_after_timeout:  # as the in-process worker: no further call
                self.stuck = f"{what} did not return within {timeout:g} s"
            raise CaseError(f"timed out: {what} did not return within {timeout:g} s "
                            "(the adapter process was stopped)") from None
        except _Gone:
            rc = self._reap()
            self._stop()
            raise CaseError(f"{what}: the adapter process {_cause(rc)}") from None
        except OraclesError as e:
            self._broken(what, f"a malformed reply ({e})")
        if not isinstance(reply, dict):
            self._broken(what, "a reply that is not an object")
        if "interrupt" in reply:
            self._stop()
            raise KeyboardInterrupt(_text(reply["interrupt"], 500))
        if "error" in reply:
            if not isinstance(reply["error"], str):
                self._broken(what, "an error that is not a string")
            reply["error"] = _text(reply["error"], 4000)
        return reply

    def _reap(self):
        """The ended child's exit status (None: it closed its pipe but did not exit)."""
        try:
            return self._proc.wait(10) if self._proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def _broken(self, what: str, detail: str):
        self._stop()
        raise CaseError(f"{what}: the adapter process sent {detail}; it was stopped")

    def _read(self, n: int, deadline) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            # past the deadline, a reply already waiting in the pipe still counts (it came in time
            # while this side was judging the previous case)
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._from], [], [], wait)
            if not ready:
                raise _Timeout
            chunk = os.read(self._from, min(n - len(buf), 1 << 16))
            if not chunk:
                raise _Gone
            buf += chunk
        return bytes(buf)


# ---------------------------------------------------------------------------------------------
# The child
# ---------------------------------------------------------------------------------------------

def _recv(f):
    head = f.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    return json.loads(f.read(n))


def _send(f, obj) -> None:
    f.write(_frame(obj))
    f.flush()


def _build(spec: dict, label: str):
    """The adapter, built as the in-process route builds it (candidates.build_adapter), and its
    engine info (a built-in engine's `info`: JSON values only) or None."""
    module, attr = spec["factory"].split(":", 1)
    make = adapter_factory(spec["factory"]) if not spec["args"] else None

    def factory():
        if make is not None:
            return make()
        return getattr(importlib.import_module(module), attr)(*spec["args"])
    adapter = build_adapter(factory, label)
    info = getattr(adapter, "info", None)
    if not (isinstance(info, dict) and {"engine", "version", "options"} <= set(info)):
        return adapter, None
    out = {"engine": str(info["engine"]), "version": str(info["version"]),
           "options": {str(k): v if isinstance(v, (str, int, bool)) or v is None
                       else str(v) for k, v in dict(info["options"]).items()}}
    if info.get("serving"):  # how it runs serving schedules (engines.load_engine; engine.json)
        out["serving"] = str(info["serving"])
    if "mode" in info:  # the profile that emulates the run (oracles/format/profiles.py)
        out["mode"] = info["mode"] if isinstance(info["mode"], str) else None
    return adapter, out


def _mode(adapter):
    """The adapter's `mode` attribute (the profile that emulates its run) if it is a string."""
    mode = getattr(adapter, "mode", None)
    return mode if isinstance(mode, str) else None


def _outputs_file(out, path: str) -> None:
    """run()'s result -> one safetensors file (names strings, values numeric arrays)."""
    arrays = _as_outputs(out)
    for k, v in arrays.items():
        if not isinstance(k, str):
            raise CaseError(f"run() returned an output named {_text(repr(k), 200)}, not a string")
        if v.dtype.kind not in "biuf" and v.dtype != ml_dtypes.bfloat16:
            raise CaseError(f"run() returned output {k!r} as {v.dtype} values, not numbers")
    try:  # a private temporary the parent reads once: no rename, no fsync
        with open(path, "xb") as f:
            write_safetensors(path, arrays, file=f)
    except OraclesError:
        raise
    except Exception as e:  # noqa: BLE001 - a dtype safetensors cannot store, a bad name
        raise CaseError(f"run()'s outputs cannot be stored as safetensors ({_text(e, 500)})") from None


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the checker ends, however it ends (prctl
    PR_SET_PDEATHSIG; a checker killed by SIGTERM or SIGKILL runs no cleanup of its own).
    Elsewhere the child still ends when it reads the end of its request pipe."""
    ppid = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != ppid:  # the checker ended before the line above
        os._exit(1)


def child_main(fd_in: int, fd_out: int) -> None:
    """Serve the parent's requests until close or end of input; never returns (os._exit)."""
    _die_with_parent()
    rf, wf = os.fdopen(fd_in, "rb"), os.fdopen(fd_out, "wb")
    adapter, goldens, cached = None, {}, {}
    _send(wf, {"ready": PROTOCOL})  # the interpreter is up: the factory's time starts now

    def case(msg):
        """The case, read from the suite the parent verified: its files are read only if they
        are still those files (their identities, Golden.file), else hashed again."""
        where, cid = msg["golden"], msg["case"]
        key = (where["path"], where["digest"], where.get("checkpoint"), cid)
        if key not in cached:
            g = goldens.get(key[:3])
            if g is None:  # (a --checkpoint's digest is checked again here)
                goldens.clear()  # one suite at a time (oracles search: one per example)
                g = goldens[key[:3]] = Golden(key[0], verify=False, expect_digest=key[1],
                                              checkpoint=key[2])
            if where["verified"] and set(where["verified"]) == set(g.cases[cid]["files"]):
                g._identity.update({(cid, n): tuple(v) for n, v in where["verified"].items()})
                g._verified.add(cid)
            cached.clear()
            cached[key] = g.load_case(cid)
        return cached[key]

    code = 0
    while True:
        try:
            msg = _recv(rf)
        except (OSError, ValueError):
            msg = None
        if msg is None:  # the parent is gone
            break
        op = msg.get("op")
        what = {"start": "the factory", "close": "close()"}.get(op, op)
        try:
            if op == "start":
                sys.path[:] = msg["sys_path"]
                adapter, info = _build(msg["spec"], msg["label"])
                reply = {"ok": True, "info": info, "mode": _mode(adapter)}
            elif op == "case":  # supports, answered; then run, answered, if supported
                what = "supports()"
                c = case(msg)
                verdict = _supported(adapter.supports(c))
                if verdict is True:
                    _send(wf, {"value": True})
                    what = "run()"
                    _outputs_file(adapter.run(c), msg["out"])
                    cached.clear()
                    reply = {"ok": True}
                else:
                    reply = {"value": verdict}
            elif op == "close":
                close = getattr(adapter, "close", None)
                adapter = None
                if callable(close):
                    close()
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown request {op!r}"}
        except KeyboardInterrupt:
            reply = {"interrupt": f"{what} raised KeyboardInterrupt"}
        except (OraclesError, CaseError) as e:
            reply = {"error": _text(e)}
        except SystemExit as e:
            reply = {"error": (f"{msg.get('label')}: the factory raised SystemExit: {_text(e.code)}"
                               if op == "start" else
                               f"{what} called sys.exit({_text(e.code)}): an adapter must return or raise")}
        except BaseException as e:  # noqa: BLE001 - the adapter's, reported for this case
            reply = {"error": f"{what} raised {type(e).__name__}: {_text(e)}"}
        try:
            _send(wf, reply)
        except (OSError, ValueError):
            code = 1
            break
        if op == "close":
            break
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)  # no interpreter teardown: an engine's threads or destructors cannot abort it


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]))
