"""The HTML report (`oracles check ... --html`): one self-contained page a person can read.

The structure test always runs (html.parser); the render test draws the page in headless
Chromium (Debian's `chromium` package) and skips, saying why, where no browser is installed."""

import copy
import hashlib
import math
import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest

from oracles.checking import report_html
from oracles.checking.candidates import load_adapter
from oracles.checking.check import run_check
from tests.helpers import run_cli

ONLY = "rms_norm.basic,yarn_tables.v3,model.prefill.tiny,mtp_prefill.depth2,model.greedy.tiny"
HOSTILE = '<script>alert("x")</script><img src="https://evil.example/x.png">&amp;\'"'


class Page(HTMLParser):
    """Every element as (tag, attrs, text inside it up to the next tag), plus the raw tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if tag not in ("meta", "br", "hr", "img", "link", "input", "line", "rect", "path",
                       "polyline", "circle"):
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.elements.append({"tag": tag, "attrs": dict(attrs), "text": ""})

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data

    def find(self, tag=None, cls=None):
        return [e for e in self.elements if (tag is None or e["tag"] == tag)
                and (cls is None or cls in e["attrs"].get("class", "").split())]


def parse(text) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


@pytest.fixture(scope="module")
def mutant_report(default_dir, default_golden):
    """A real failing report (YaRN's softmax factor left out), with one hostile case added: a
    copy of a failing case whose id, reason and output name carry markup."""
    rep = run_check(default_golden, load_adapter("oracles.mutants:no_softmax_mscale"), "float32",
                    only=ONLY, repro_base=f"oracles check {default_dir} --adapter x")
    bad = copy.deepcopy(next(r for r in rep["cases"] if r["id"] == "model.prefill.tiny"))
    bad.update(id=HOSTILE, reason=HOSTILE, repro=HOSTILE, first_failure=HOSTILE)
    bad["outputs"][0]["name"] = HOSTILE
    rep["cases"].append(bad)
    rep["counts"]["fail"] += 1
    return rep


def test_the_page_has_the_summary_digest_profile_and_one_chart_per_failing_case(mutant_report, default_dir):
    rep = mutant_report
    page = parse(report_html.render(rep))
    rows = page.find("table", "summary")[0]
    summary_rows = [e for e in page.elements if e["tag"] == "tr"]
    ids_in_rows = [e["text"] for e in page.find("td", "id")]
    assert ids_in_rows == [r["id"] for r in rep["cases"]]  # one row per case, in order
    assert "FAIL" in rows["text"] and "PASS" in rows["text"]
    assert len(summary_rows) > len(rep["cases"])
    with open(os.path.join(default_dir, "manifest.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert [e["text"] for e in page.find("td", "digest")] == [digest]
    meta = {th["text"]: td["text"] for th, td in zip(page.find("th"), page.find("td", "mono"))}
    assert meta["profile"] == "float32" and meta["suite"] == "default"
    assert meta["candidate (engine)"] == "oracles.mutants:no_softmax_mscale"

    failing = [r for r in rep["cases"] if r["status"] == "fail"]
    # yarn_tables.v3, model.prefill.tiny, mtp_prefill.depth2 and the hostile copy; the greedy
    # stream's designed margins keep it (oracles/authoring/margins.py): it passes
    assert len(failing) == 4
    charts = page.find("svg", "chart")
    assert len(charts) == len(failing)
    assert len(page.find("line", "tolerance-line")) == len(failing)
    assert len(page.find("line", "first-divergence")) == len(failing)
    repro = [e["text"] for e in page.find("pre", "repro")]
    assert repro == [r["repro"] for r in failing]


def _points(page):
    """The charts' points in document order: (output name, status, ratio text, y)."""
    out = []
    for e in page.find(cls="point"):
        a = e["attrs"]
        y = float(a["cy"]) if e["tag"] == "circle" else float(a["d"].split()[1])
        out.append((a["data-output"], a["data-status"], a["data-ratio"], y, e["tag"]))
    return out


def test_each_chart_puts_the_failing_outputs_above_the_tolerance_line_and_marks_the_first(mutant_report):
    """Point by point: dataflow order, passing outputs at or below the 1.0 line, failing ones
    above it, the first divergence a diamond labelled with its name."""
    page = parse(report_html.render(mutant_report))
    points, lines = _points(page), page.find("line", "tolerance-line")
    labels = [e["text"] for e in page.find("text") if e["text"].startswith("first divergence: ")]
    failing = [r for r in mutant_report["cases"] if r["status"] == "fail"]
    i = 0
    for r, line, label in zip(failing, lines, labels):
        y1 = float(line["attrs"]["y1"])
        mine = points[i:i + len(r["outputs"])]
        i += len(r["outputs"])
        assert [p[0] for p in mine] == [o["name"] for o in r["outputs"]]
        for (name, status, ratio, y, tag), o in zip(mine, r["outputs"]):
            assert status == o["status"]
            ratio = float(ratio)
            assert (ratio > 1) == (status == "fail"), (r["id"], name, ratio)
            assert (y < y1) if status == "fail" else (y >= y1), (r["id"], name)
        first = [p for p in mine if p[0] == r["first_failure"]]
        assert len(first) == 1 and first[0][4] == "path"  # the diamond
        assert label == f"first divergence: {r['first_failure']}"
    assert i == len(points)


def test_nothing_outside_the_file_is_referenced_and_file_text_is_escaped(mutant_report):
    text = report_html.render(mutant_report)
    page = parse(text)
    assert not page.find("script") and not page.find("img") and not page.find("link")
    assert not page.find("iframe") and not page.find("object")
    for e in page.elements:
        for k, v in e["attrs"].items():
            assert k not in ("src", "srcset", "xlink:href", "action"), e
            if k == "href":
                assert v.startswith("#"), v  # links stay inside the page
            assert not (v or "").lower().startswith(("http:", "https:", "//", "javascript:")), (k, v)
            assert not k.startswith("on"), k  # no event handlers
    for style in page.find("style"):
        assert "url(" not in style["text"] and "@import" not in style["text"]
    # the hostile id shows as text, in the table, the heading and the reproduce command
    assert HOSTILE in [e["text"] for e in page.find("td", "id")]
    assert HOSTILE in [e["text"] for e in page.find("pre", "repro")]
    assert any(e["text"] == f"first divergence: {HOSTILE}" for e in page.find("text"))
    assert "<script>" not in text and '<img src="https' not in text


def test_error_over_tolerance_by_hand():
    r = report_html.output_ratio
    assert r({"status": "pass", "metrics": {"nmse": 1e-12, "max_rel": 5e-6}, "tol": {"nmse": 1e-11, "max_rel": 2e-5}}) \
        == pytest.approx(0.25)
    assert r({"status": "fail", "metrics": {"mismatch": 0.5}, "tol": {"mismatch": 0}}) == math.inf
    assert r({"status": "pass", "metrics": {"mismatch": 0.0}, "tol": {"mismatch": 0}}) == 0.0
    assert r({"status": "fail", "message": "missing (a required output)"}) == math.inf
    # a metric without a tolerance (the forgiven count) is not an error
    assert r({"status": "pass", "metrics": {"nmse": 2e-11, "forgiven": 3}, "tol": {"nmse": 1e-11}}) \
        == pytest.approx(2.0)


def test_the_digest_comes_from_the_report_when_it_has_one():
    assert report_html.suite_digest({"suite_digest": "abc123", "golden": "/nonexistent"}) == "abc123"
    assert report_html.suite_digest({"golden": "/nonexistent"}) is None


def test_check_writes_the_html_report_and_a_bad_path_is_one_line(default_dir, tmp_path):
    out = tmp_path / "report.html"
    r = run_cli("check", default_dir, "--adapter", "oracles.mutants:zero_group_mask",
                "--only", "model.prefill.negative_biased,rms_norm.basic", "--html", out,
                module="oracles")
    assert r.returncode == 1
    page = parse(out.read_text(encoding="utf-8"))
    assert len(page.find("svg", "chart")) == 1
    assert [e["text"] for e in page.find("text") if e["text"].startswith("first divergence")] == \
        ["first divergence: layers.1.topk_idx"]
    r = run_cli("check", default_dir, "--adapter", "oracles.adapters:refimpl_float32", "--only",
                "rms_norm.basic", "--html", tmp_path / "no" / "such" / "dir.html", module="oracles")
    assert r.returncode == 2  # refused before the check runs
    assert len(r.stderr.strip().splitlines()) == 1 and "dir.html" in r.stderr


# ---- rendering in a real browser ---------------------------------------------------------------

def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def read_png(path):
    """(width, height, rows of (r, g, b) tuples) of an 8-bit RGB/RGBA non-interlaced PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour, _, _, interlace = head
    assert depth == 8 and colour in (2, 6) and interlace == 0, head
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(w)])
        prev = line
    return w, h, rows


def test_the_report_renders_in_headless_chromium(mutant_report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium package (apt-get install chromium) "
                    "to render the HTML report")
    page = tmp_path / "report.html"
    report_html.write_html(str(page), mutant_report)
    shot = tmp_path / "shot.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400",
                        f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    w, h, rows = read_png(shot)
    assert (w, h) == (1200, 1400)

    def count(hex_colour):
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        return sum(px == rgb for row in rows for px in row)
    # the legend swatches (12 x 12) and the first charts' markers are drawn in their colours,
    # and the page is mostly white with dark text: it rendered, styled, with its SVG
    assert count(report_html.FAIL_COLOUR) >= 144
    assert count(report_html.PASS_COLOUR) >= 144
    white = count("#ffffff")
    assert 0.5 * w * h < white < 0.99 * w * h


def test_an_inconclusive_case_gets_a_chart_and_a_case_without_outputs_a_line(mutant_report):
    rep = copy.deepcopy(mutant_report)
    for r in rep["cases"]:
        if r["status"] == "fail":
            r["status"] = "pass"
    rep["cases"][0].update(status="inconclusive", reason="compared 10% of tokens, below 50%")
    rep["cases"].append({"id": "x.crashed", "kind": "prefill", "pins": "", "status": "error",
                         "reason": "candidate raised ValueError: <boom>", "outputs": [],
                         "not_provided": []})
    page = parse(report_html.render(rep))
    assert len(page.find("svg", "chart")) == 1
    assert any("candidate raised ValueError: <boom>" in e["text"] for e in page.find("li"))
