"""docs/math.md and Config's symbol table stay true to the code: every `module.function` the guide
names exists, every figure it embeds is in the repository, and every V3 value in the two symbol
tables is the deepseek-v3 preset's."""

from __future__ import annotations

import importlib
import math
import os
import re

import pytest

from refimpl import rope
from refimpl.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "math.md")
MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "refimpl"))
                 if f.endswith(".py") and not f.startswith("_"))
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
REFERENCE = re.compile(rf"(?:refimpl\.)?({'|'.join(MODULES)})((?:\.{IDENT})+)(?:\(.*\))?")


def _text() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def _code_spans(text: str) -> list[str]:
    """The contents of `...` spans outside fenced blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def references(text: str) -> list[tuple[str, str]]:
    """(module, dotted attribute) for each code span that names refimpl code; tensor names
    (`model.norm.weight`, ...) are checkpoint names, not code."""
    out = []
    for span in _code_spans(text):
        m = REFERENCE.fullmatch(span.strip())
        if m and not span.endswith((".weight", ".bias")):
            out.append((m.group(1), m.group(2)[1:]))
    return out


def resolve(module: str, dotted: str):
    obj = importlib.import_module(f"refimpl.{module}")
    for part in dotted.split("."):
        if isinstance(obj, type) and part in getattr(obj, "__dataclass_fields__", {}):
            return obj.__dataclass_fields__[part]  # a dataclass field without a default
        obj = getattr(obj, part)
    return obj


def test_the_reference_parser_finds_names_and_skips_tensor_names():
    spans = "`mla.query`, `refimpl.moe.route(u, w)`, `model.Model.forward`, `model.norm.weight`, `x.y`"
    assert references(spans) == [("mla", "query"), ("moe", "route"), ("model", "Model.forward")]
    with pytest.raises(AttributeError):
        resolve("mla", "no_such_function")


def test_every_function_the_guide_names_exists():
    refs = references(_text())
    assert len(refs) > 60  # the guide is made of them
    missing = []
    for module, dotted in refs:
        try:
            resolve(module, dotted)
        except AttributeError:
            missing.append(f"{module}.{dotted}")
    assert not missing, f"docs/math.md names code that does not exist: {sorted(set(missing))}"


def test_the_guide_names_the_block_functions():
    names = {f"{m}.{d}" for m, d in references(_text())}
    assert {"mla.attention_block", "moe.moe_ffn", "moe.group_mask", "layer.decoder_layer"} <= names


def test_every_embedded_figure_exists():
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _text())
    assert len(figures) == 3
    for path in figures:
        assert os.path.isfile(os.path.join(ROOT, "docs", path)), path


def _preset_value(cfg: Config, field: str):
    obj = cfg
    for part in field.split("."):
        obj = getattr(obj, part)
    return obj


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_guide_symbol_table_values_are_the_presets():
    cfg = Config.preset("deepseek-v3")
    rows = [r for r in _text().splitlines() if r.startswith("| ") and r.count("|") == 5]
    checked = 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        field = re.fullmatch(r"`([a-z_.]+)`", cells[2])
        if not field or not re.fullmatch(r"[0-9.e,-]+", cells[3]):
            continue
        assert _number(cells[3]) == pytest.approx(_preset_value(cfg, field.group(1)), rel=1e-12), row
        checked += 1
    assert checked >= 20
    rs = cfg.rope_scaling
    assert "| 1.3688879 |" in _text() and round(rope.yarn_mscale(rs.factor, rs.mscale_all_dim), 7) == 1.3688879


def test_config_docstring_symbol_table_values_are_the_presets():
    cfg = Config.preset("deepseek-v3")
    fields = {f for f in Config.__dataclass_fields__}
    checked = 0
    for line in Config.__doc__.splitlines():
        names = re.findall(r"\b(rope_scaling\.[a-z_]+|[a-z_]+)\b", line)
        numbers = re.findall(r"(?<![\w.])(\d[\d.]*)\b", line.split("  ")[-1] if "  " in line else "")
        known = [n for n in names if n in fields or n.startswith("rope_scaling.")]
        if not known or not numbers:
            continue
        if line.strip().startswith("sqrt(t)"):  # m(s, mscale_all_dim) = 0.1 ln s + 1
            rs = cfg.rope_scaling
            assert float(numbers[-1]) == round(rope.yarn_mscale(rs.factor, rs.mscale_all_dim), 7)
            checked += 1
            continue
        assert float(numbers[0]) == _preset_value(cfg, known[0]), line
        for name, value in re.findall(r"([a-z_]+) = (\d+)", line):  # "of n_group = 8"
            assert float(value) == _preset_value(cfg, name), line
        checked += 1
    assert checked >= 20
    assert math.isclose(cfg.qk_head_dim, 192)
