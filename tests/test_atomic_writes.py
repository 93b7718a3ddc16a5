"""Every writer (refimpl logits/make-checkpoint, oracles generate/run/check --json) is atomic,
never merges into a non-empty directory, refuses unusable destinations and lost races with one
line and exit 2, honours the umask, and removes its own stale temporaries (refimpl/atomic.py;
docs/validation.md, "Writes")."""

import errno
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl import atomic
from refimpl.writer import make_checkpoint
from tests.helpers import ROOT, run_main

TINY = refimpl.Config.preset("tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("aw") / "tiny"
    make_checkpoint(d, TINY.replace(num_nextn_predict_layers=0), seed=0)
    return d


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    p = tmp_path_factory.mktemp("aw-tokens") / "t.npy"
    np.save(p, np.array([[1, 2, 3, 4]]))
    return p


def listing(root):
    """Every path under root (files and directories), relative."""
    out = set()
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def one_line(rc, err, prog="refimpl", *needles):
    assert rc == 2, (rc, err)
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


# ---- the writers, as a user calls them --------------------------------------------------------

def writers(ckpt, tokens):
    """name -> (kind of destination, program, argv with OUT for the destination)."""
    return {
        "logits": ("file", "refimpl", ["logits", "--checkpoint", ckpt, "--tokens", tokens,
                                       "--out", "OUT"]),
        "make-checkpoint": ("directory", "refimpl", ["make-checkpoint", "--preset", "tiny",
                                                     "--out", "OUT"]),
        "oracles generate": ("directory", "oracles", ["generate", "--suite", "smoke", "--only",
                                                      "gate.*", "--out", "OUT"]),
        "oracles run": ("directory", "oracles", ["run", "no-such-suite", "--adapter",
                                                 "oracles.adapters:refimpl_float32", "--out", "OUT"]),
        "oracles check --json": ("file", "oracles", ["check", "no-such-suite", "no-such-candidate",
                                                     "--json", "OUT"]),
    }


WRITERS = ["logits", "make-checkpoint", "oracles generate", "oracles run", "oracles check --json"]


def run_writer(ckpt, tokens, name, out):
    kind, prog, argv = writers(ckpt, tokens)[name]
    return prog, run_main(*[out if a == "OUT" else a for a in argv], module=prog)


def bad_destination(tmp_path, case, kind):
    """Make the destination `case` under tmp_path -> (path, expected words)."""
    if case == "parent missing":
        return tmp_path / "missing" / "out", "does not exist"
    if case == "dangling symlink":
        os.symlink(tmp_path / "nowhere", tmp_path / "link")
        return tmp_path / "link", "symbolic link"
    if case == "wrong kind":
        if kind == "file":
            (tmp_path / "adir").mkdir()
            return tmp_path / "adir", "is a directory"
        (tmp_path / "afile").write_text("mine")
        return tmp_path / "afile", "is a file"
    if case == "not empty":
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep").write_text("mine")
        return tmp_path / "full", "not an empty directory"
    raise ValueError(case)


KINDS = {"logits": "file", "make-checkpoint": "directory", "oracles generate": "directory",
         "oracles run": "directory", "oracles check --json": "file"}
BAD = [(name, case) for name in WRITERS
       for case in ("parent missing", "dangling symlink", "wrong kind", "not empty")
       if not (case == "not empty" and KINDS[name] == "file")]  # a file is replaced, not merged


@pytest.mark.parametrize("name, case", BAD)
def test_unusable_destinations_are_refused_with_one_line(ckpt, tokens, tmp_path, name, case):
    kind = writers(ckpt, tokens)[name][0]
    out, words = bad_destination(tmp_path, case, kind)
    before = listing(tmp_path)
    prog, (rc, _, err) = run_writer(ckpt, tokens, name, out)
    one_line(rc, err, prog, words)
    assert listing(tmp_path) == before  # nothing written, no temporary left
    if case == "not empty":
        assert os.listdir(out) == ["keep"]


@pytest.mark.parametrize("name", WRITERS)
def test_a_read_only_destination_is_refused_with_one_line(ckpt, tokens, tmp_path, name, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: access(2) answers as on a read-only mount
        real = os.access
        monkeypatch.setattr(atomic.os, "access",
                            lambda p, m: m != os.W_OK and real(p, m) if os.path.abspath(p) == str(ro)
                            else real(p, m))
    try:
        prog, (rc, _, err) = run_writer(ckpt, tokens, name, ro / "out")
        one_line(rc, err, prog, "cannot write in", "permission denied")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_a_temporary_that_cannot_be_created_is_one_error(tmp_path, monkeypatch):
    real = os.open

    def read_only_fs(path, flags, *a):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *a)

    monkeypatch.setattr(atomic.os, "open", read_only_fs)
    with pytest.raises(refimpl.RefimplError, match=r"x.npy: cannot write \(Read-only file system\)"):
        with atomic.atomic_file(tmp_path / "x.npy"):
            pass
    assert os.listdir(tmp_path) == []


def test_writing_fails_midway_with_an_os_error_leaves_nothing(tmp_path):
    with pytest.raises(refimpl.RefimplError, match=r"out.bin: cannot write \(No space left"):
        with atomic.atomic_file(tmp_path / "out.bin") as f:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(tmp_path / "d") as d:
            open(os.path.join(d, "x"), "w").close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# ---- races ------------------------------------------------------------------------------------

def test_make_checkpoint_that_loses_the_race_keeps_the_winners_result(tmp_path, monkeypatch):
    from refimpl import writer

    out = tmp_path / "ck"
    real = writer.write_safetensors_planned

    def meanwhile(path, *a, **k):  # another writer finishes while we write
        if not out.exists():
            out.mkdir()
            (out / "theirs").write_text("winner")
        return real(path, *a, **k)

    monkeypatch.setattr(writer, "write_safetensors_planned", meanwhile)
    rc, _, err = run_main("make-checkpoint", "--preset", "tiny", "--out", out)
    one_line(rc, err, "refimpl", "another writer created it")
    assert sorted(os.listdir(tmp_path)) == ["ck"] and os.listdir(out) == ["theirs"]


@pytest.mark.parametrize("existed", [False, True])
def test_logits_that_loses_the_race_keeps_the_winners_file(ckpt, tokens, tmp_path, monkeypatch,
                                                            existed):
    from refimpl import cli

    out = tmp_path / "l.npy"
    if existed:
        out.write_bytes(b"old")
    real = cli.run_logits

    def meanwhile(*a, **k):
        result = real(*a, **k)
        tmp = tmp_path / "theirs.tmp"  # the other writer's own atomic replace
        tmp.write_bytes(b"winner")
        os.replace(tmp, out)
        return result

    monkeypatch.setattr(cli, "run_logits", meanwhile)
    rc, _, err = run_main("logits", "--checkpoint", ckpt, "--tokens", tokens, "--out", out)
    one_line(rc, err, "refimpl", "another writer created or replaced it")
    assert os.listdir(tmp_path) == ["l.npy"] and out.read_bytes() == b"winner"


def test_oracles_run_never_merges_into_an_existing_result(tmp_path, monkeypatch):
    from oracles import cli
    from oracles.checking import candidates as adapters

    out = tmp_path / "cand"

    def fake_write_outputs(golden, candidate, where, only, **kw):
        os.makedirs(os.path.join(where, "cases", "a"))
        out.mkdir()  # another run published meanwhile
        (out / "stale").write_text("theirs")
        return {}

    monkeypatch.setattr(adapters, "write_outputs", fake_write_outputs)
    rc, _, err = run_main("run", "suite", "--adapter", "oracles.adapters:refimpl_float32",
                          "--out", out, module="oracles")
    one_line(rc, err, "oracles", "another writer created it")
    assert os.listdir(tmp_path) == ["cand"] and os.listdir(out) == ["stale"]


# ---- permissions follow the umask -------------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_honour_the_umask(ckpt, tokens, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        assert run_main("logits", "--checkpoint", ckpt, "--tokens", tokens,
                        "--out", tmp_path / "l.npy")[0] == 0
        assert run_main("make-checkpoint", "--preset", "tiny", "--shards", "2",
                        "--out", tmp_path / "ck")[0] == 0
        assert run_main("generate", "--suite", "smoke", "--only", "gate.*",
                        "--out", tmp_path / "suite", module="oracles")[0] == 0
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "l.npy") == file_mode
    for top in ("ck", "suite"):
        assert mode(tmp_path / top) == dir_mode
        for rel in listing(tmp_path / top):
            p = tmp_path / top / rel
            assert mode(p) == (dir_mode if p.is_dir() else file_mode), rel


# ---- stale temporaries of earlier killed runs -------------------------------------------------

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed_and_no_others(tmp_path):
    dead = dead_pid()
    host = atomic.HOST
    stale_dir = tmp_path / f".old.refimpl-tmp-{host}-{dead}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(bytes(1 << 20))
    stale_file = tmp_path / f".l.npy.refimpl-tmp-{host}-{dead}-beef"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".x.refimpl-tmp-{host}-1-cafe"  # pid 1 is alive
    elsewhere = tmp_path / f".y.refimpl-tmp-{host}x-{dead}-cafe"  # another machine's: its pid means nothing here
    elsewhere.write_bytes(b"theirs")
    live.write_bytes(b"someone's")
    other_kind = tmp_path / f".s.oracles-tmp-{host}-{dead}-feed"  # not refimpl's to remove
    other_kind.mkdir()
    unrelated = tmp_path / ".keepme"
    unrelated.write_text("x")
    rc, _, err = run_main("make-checkpoint", "--preset", "tiny", "--out", tmp_path / "new")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, elsewhere.name, other_kind.name,
                                                   unrelated.name, "new"])
    rc, _, err = run_main("generate", "--suite", "smoke", "--only", "gate.*", "--out",
                          tmp_path / "suite", module="oracles")
    assert rc == 0, err
    assert not other_kind.exists() and live.exists()


KILLED_WRITER = """
import os, signal, sys
import refimpl
from refimpl.writer import make_checkpoint
def progress(k, n):
    if k == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # killed after the first of 3 shards
make_checkpoint(sys.argv[1], refimpl.Config.preset("tiny"), shards=3, progress=progress)
"""


def test_a_killed_make_checkpoint_leaves_a_temporary_the_next_run_removes(tmp_path):
    out = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert not out.exists() and len(left) == 1 and left[0].startswith(".ck.refimpl-tmp-"), left
    assert "model-00001-of-00003.safetensors" in os.listdir(tmp_path / left[0])
    rc, _, err = run_main("make-checkpoint", "--preset", "tiny", "--shards", "3", "--out", out)
    assert rc == 0, err
    assert os.listdir(tmp_path) == ["ck"]
    assert refimpl.load(out).cfg == TINY


def test_a_file_destination_is_replaced_whole(ckpt, tokens, tmp_path):
    out = tmp_path / "l.npy"
    out.write_bytes(b"previous run")
    assert run_main("logits", "--checkpoint", ckpt, "--tokens", tokens, "--out", out)[0] == 0
    np.testing.assert_array_equal(np.load(out), refimpl.load(ckpt).forward(np.array([[1, 2, 3, 4]])))
    assert os.listdir(tmp_path) == ["l.npy"]
