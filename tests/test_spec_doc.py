"""docs/spec.md is the specification the code cites: every "spec section N" in the code and the
documents names a section that exists there, nothing points to the team's shared notes any more,
and the values the spec states are the preset's and refimpl's (computed here, not copied)."""

from __future__ import annotations

import math
import os
import re

import pytest

from refimpl import accounting, rope
from refimpl.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "docs", "spec.md")
SHARED_NOTES = "SPEC" + ".md"  # the team's notes, which users never see (spelled apart: not a mention)
SCANNED_DIRS = ("refimpl", "oracles", "tests", "benchmarks", "docs", "scripts")
SCANNED_FILES = ("README.md", "pyproject.toml")
EXTENSIONS = (".py", ".md", ".sh", ".toml", ".txt", ".json", ".cfg", ".yml", ".yaml")
SKIPPED_DIRS = {".venv", ".git", "__pycache__", ".hypothesis", ".pytest_cache", "build", "dist"}
NUMBER = r"\d+(?:\.\d+)?"
CITATION = re.compile(rf"\bspec(?:\.md)?\s+sections?\s+({NUMBER}(?:(?:\s*,\s*(?:and\s+)?|\s*-\s*|\s+and\s+){NUMBER})*)",
                      re.I)


def _text(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def scanned_files() -> list[str]:
    """Relative paths of the repository's text files that may cite the spec."""
    out = [f for f in SCANNED_FILES if os.path.isfile(os.path.join(ROOT, f))]
    for top in SCANNED_DIRS:
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            out += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if f.endswith(EXTENSIONS)]
    return sorted(out)


def cited_sections(text: str) -> list[str]:
    """The section numbers of every "spec section(s) ..." in text: lists ("5, 7, 9 and 10") and
    ranges ("4-7") expanded."""
    out = []
    for m in CITATION.finditer(text):
        for part in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", m.group(1)):
            if "-" in part:
                lo, hi = (int(x) for x in re.split(r"\s*-\s*", part))
                out += [str(n) for n in range(lo, hi + 1)]
            else:
                out.append(part)
    return out


def spec_sections() -> set[str]:
    """The numbers of the spec's `## N.` and `### N.M` headings."""
    return set(re.findall(rf"^#{{2,3}} ({NUMBER})\.? ", _text(SPEC), flags=re.M))


def test_the_citation_parser_reads_lists_and_ranges():
    text = ("(spec section 3) spec sections 5, 7, 9 and 10; spec sections 4-7, the spec\n"
            "    section 9.2) Spec section 8's; docs/spec.md section 1; spec sections 9.1 and 9.3;"
            " spec section nine; the spec's sections; spec section 9, top-k")
    assert cited_sections(text) == ["3", "5", "7", "9", "10", "4", "5", "6", "7", "9.2", "8", "1",
                                    "9.1", "9.3", "9"]


def test_the_spec_has_its_sections():
    assert {str(n) for n in range(1, 11)} | {"9.1", "9.2", "9.3"} <= spec_sections()


def test_every_spec_citation_in_code_and_docs_names_a_section_of_the_spec():
    sections = spec_sections()
    found, missing = 0, []
    for rel in scanned_files():
        text = _text(os.path.join(ROOT, rel))
        for m in CITATION.finditer(text):
            line_no = text.count("\n", 0, m.start()) + 1
            for n in cited_sections(m.group(0)):
                found += 1
                if n not in sections:
                    missing.append(f"{rel}:{line_no}: spec section {n}")
    assert found > 60  # the code and the docs are made of them
    assert not missing, f"citations of sections docs/spec.md does not have: {missing}"


def test_nothing_points_to_the_shared_notes():
    mentions = []
    for rel in scanned_files():
        if SHARED_NOTES in _text(os.path.join(ROOT, rel)):
            mentions.append(rel)
    assert not mentions, f"{SHARED_NOTES} is not part of the repository; cite docs/spec.md: {mentions}"


def _preset_value(cfg: Config, field: str):
    obj = cfg
    for part in field.split("."):
        obj = getattr(obj, part)
    return obj


def test_section_1_values_are_the_presets():
    cfg = Config.preset("deepseek-v3")
    text = _text(SPEC)
    section_1 = text[text.index("\n## 1. "):text.index("\n## 2. ")]
    rows = re.findall(r"^\| `([a-z_.]+)` \| [^|]* \| ([^|]+) \|$", section_1, flags=re.M)
    assert len(rows) >= 30
    for field, value in rows:
        expected = _preset_value(cfg, field)
        if isinstance(expected, bool):
            assert value.strip() == str(expected).lower(), field
        elif isinstance(expected, str):
            assert value.strip() == expected, field
        else:
            assert float(value) == pytest.approx(expected, rel=1e-12), field


def test_the_numbers_sections_3_and_8_state_are_refimpls():
    text = " ".join(_text(SPEC).split())
    cfg = Config.preset("deepseek-v3")
    rs = cfg.rope_scaling
    cd = [rope.correction_dim(r, cfg.qk_rope_head_dim, cfg.rope_theta,
                              rs.original_max_position_embeddings) for r in (rs.beta_fast, rs.beta_slow)]
    assert f"cd(32) = {cd[0]:.2f} and cd(1) = {cd[1]:.2f}" in text
    assert "low = {} and high = {}".format(*rope.correction_range(rs, cfg.qk_rope_head_dim, cfg.rope_theta)) in text
    assert f"{rope.yarn_mscale(rs.factor, rs.mscale_all_dim):.7f} for V3" in text
    assert math.isclose(0.1 * math.log(40) + 1, rope.yarn_mscale(40, 1.0))
    assert f"= {rope.softmax_scale(cfg):.8f})" in text
    assert rope.cos_sin_factor(cfg) == 1.0
    s = accounting.summary(cfg)
    layer = accounting.layer_summary(cfg, cfg.first_k_dense_replace)
    kv = accounting.kv_cache(cfg)
    for stated in (f"holds {s['total_params']:,} parameters",
                   f"about {s['active_params_per_token'] / 1e9:.2f} billion",
                   f"({s['active_params_per_token_without_embedding'] / 1e9:.2f} billion without",
                   f"adds {s['mtp_params_unique'] / 1e9:.1f} billion of its own ("
                   f"{s['mtp_params'] / 1e9:.1f} billion with",
                   f"An MoE layer holds {layer['ffn_total']:,} parameters",
                   f"of which {layer['ffn_active']:,} are active",
                   f"MLA's {kv['mla_values_per_token_per_layer']} values against "
                   f"{kv['mha_values_per_token_per_layer']:,}",
                   f"{100 * kv['mla_fraction_of_mha']:.2f}% of it"):
        assert stated in text, stated
