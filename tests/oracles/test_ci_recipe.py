"""The GitHub Actions job of docs/conformance.md section 11: every `run:` command of it, read
from the document, run with the smoke suite, the reference adapter and a local install (pip
offline and in dry-run mode), no network."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from oracles.authoring import writer
from oracles.format import golden

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOC = os.path.join(ROOT, "docs", "conformance.md")


def recipe() -> str:
    text = open(DOC, encoding="utf-8").read()
    section = text.split("### A GitHub Actions job", 1)[1]
    return section.split("```yaml\n", 1)[1].split("\n```", 1)[0]


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _scalar(v):
    v = v.split(" #", 1)[0].strip()
    if v.startswith('"'):
        return json.loads(v)
    if v.startswith("[") and v.endswith("]"):
        return [x.strip() for x in v[1:-1].split(",")]
    return v


def _mapping(lines, i, indent):
    """The block mapping at `indent` starting at lines[i] -> (dict, next i). (List items are
    rewritten in `lines` as mappings: pass a copy.)"""
    out = {}
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.strip().startswith("#"):
            i += 1
            continue
        if _indent(line) < indent:
            break
        key, _, v = line.strip().partition(":")
        v = v.strip()
        i += 1
        if v == "|":  # a block scalar: the deeper lines, dedented
            block = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                block.append(lines[i])
                i += 1
            ind = min(_indent(b) for b in block if b.strip())
            out[key] = "\n".join(b[ind:] for b in block).strip("\n") + "\n"
        elif v and not v.startswith("#"):
            out[key] = _scalar(v)
        else:  # a nested mapping, or a list of mappings
            while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("#")):
                i += 1
            sub = _indent(lines[i])
            if lines[i].strip().startswith("- "):
                items = []
                while i < len(lines) and _indent(lines[i]) == sub and lines[i].strip().startswith("- "):
                    lines[i] = " " * (sub + 2) + lines[i].strip()[2:]  # the item's first key
                    item, i = _mapping(lines, i, sub + 2)
                    items.append(item)
                out[key] = items
            else:
                out[key], i = _mapping(lines, i, sub)
    return out, i


def parse(yaml_text):
    """The job's env and steps, read the way GitHub reads this much YAML (block mappings, lists
    of mappings, `|` block scalars, plain and double-quoted scalars, comments)."""
    doc, _ = _mapping(list(yaml_text.splitlines()), 0, 0)
    job = doc["jobs"]["oracles"]
    return job["env"], job["steps"], doc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("golden") / "smoke")
    writer.generate(out, "smoke")
    return out


def test_the_recipe_parses_as_yaml_the_way_the_test_reads_it():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(recipe())
    doc["on"] = doc.pop(True)  # YAML 1.1 reads the key `on` as true; GitHub reads it as "on"
    env, steps, ours = parse(recipe())

    def norm(x):  # the last block scalar of a document keeps no line break in PyYAML
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, list):
            return [norm(v) for v in x]
        return x.rstrip("\n") if isinstance(x, str) else x
    assert norm(ours) == norm(doc)


def test_the_pinned_question_digest_is_the_default_suite_of_this_checkout(default_golden):
    env, _, _ = parse(recipe())
    assert env["SUITE"] == "default"
    assert env["QUESTION_DIGEST"] == default_golden.question_digest, \
        "the default suite asks other questions now: update QUESTION_DIGEST in docs/conformance.md"


def test_every_command_of_the_recipe_runs(tmp_path, smoke):
    env_doc, steps, _ = parse(recipe())
    runs = [s["run"] for s in steps if "run" in s]
    assert len(runs) == 4 and any("oracles check" in r for r in runs)
    # the package to install: a copy of this checkout (pip writes its metadata beside it)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("refimpl", "oracles"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    extras = env_doc["ORACLES_PACKAGE"].split("]", 1)[0] + "]"
    env = {**os.environ,
           "ORACLES_PACKAGE": f"{extras} @ file://{src}",
           "SUITE": "smoke", "QUESTION_DIGEST": golden.Golden(smoke).question_digest,
           "PROFILE": "", "CANDIDATE": "--adapter oracles.adapters:refimpl_float32",
           "KNOWN": os.path.join(ROOT, env_doc["KNOWN"]),
           # pip: offline, resolve and build the metadata only, with this interpreter's setuptools
           "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PIP_DRY_RUN": "1", "PIP_NO_BUILD_ISOLATION": "0",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    work = tmp_path / "ws"
    work.mkdir()
    for script in runs:
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                           capture_output=True, text=True)
        assert p.returncode == 0, (script, p.stdout[-2000:], p.stderr[-2000:])
        if "pip install" in script:
            assert "Would install deepseek-v3-refimpl" in p.stdout
            assert "does not provide the extra" not in p.stdout + p.stderr
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    for name in upload["with"]["path"].split():
        assert (work / name).is_file(), name
    rep = json.loads((work / "report.json").read_text())
    assert rep["ok"] and rep["pinned"] == "question" and rep["known"]["file"] == env["KNOWN"]
    assert rep["profile"] == rep["mode"] == "float32"  # no PROFILE: the one of the adapter's mode
    assert json.loads((work / "verify.json").read_text())["ok"]
    # a cached suite (another run, maybe another machine) is used as it is, not regenerated
    manifest = work / "golden" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    generate_step = next(r for r in runs if "oracles generate" in r)
    subprocess.run(["bash", "-euo", "pipefail", "-c", generate_step], cwd=work, env=env, check=True)
    assert manifest.stat().st_mtime_ns == before
