"""Config: the model's sizes and choices, read from and written to a Hugging Face config.json.

Accepts model_type deepseek_v3 and deepseek_v2, the published form of the rope settings
(`rope_scaling` with `type`, top-level `rope_theta`) and the transformers 5 form
(`rope_parameters` with `rope_type` and `rope_theta` inside). Numbers that don't fit together are
refused with a ConfigError naming the field, and so is every field of the wrong JSON type
(booleans are JSON booleans, integers JSON integers, floats finite and in FLOAT_RANGES) and every
count above its sane maximum (LIMITS), before anything loops or allocates (docs/validation.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources

from . import jsonfile
from .atomic import write_text
from .errors import ConfigError, printable

_SCORING = ("sigmoid", "softmax")
_TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# Sane maxima for every count (docs/validation.md): far above any published DeepSeek model (V3's
# value in the comment), far below what would make a loop over layers or experts, or an
# allocation, run for minutes.  Checked before anything loops or allocates.
LIMITS = {
    "vocab_size": 1 << 22,  # 129,280
    "hidden_size": 1 << 16,  # 7,168
    "intermediate_size": 1 << 20,  # 18,432
    "moe_intermediate_size": 1 << 20,  # 2,048
    "num_hidden_layers": 1024,  # 61
    "num_attention_heads": 1024,  # 128
    "kv_lora_rank": 1 << 16,  # 512
    "q_lora_rank": 1 << 16,  # 1,536
    "qk_nope_head_dim": 1 << 12,  # 128
    "qk_rope_head_dim": 1 << 12,  # 64
    "v_head_dim": 1 << 12,  # 128
    "n_routed_experts": 1 << 12,  # 256
    "n_shared_experts": 64,  # 1
    "num_experts_per_tok": 1 << 12,  # 8
    "n_group": 1 << 12,  # 8
    "topk_group": 1 << 12,  # 4
    "first_k_dense_replace": 1024,  # 3
    "moe_layer_freq": 1024,  # 1
    "max_position_embeddings": 1 << 24,  # 163,840
    "num_nextn_predict_layers": 16,  # 1
}
# Tensors a config may imply, all layers and experts together (V3: 91,991 with FP8 scales).
MAX_TENSORS = 1 << 20
# Finite floats and their ranges: (low, high, low inclusive).
FLOAT_RANGES = {
    "rms_norm_eps": (0.0, 1.0, False),
    "rope_theta": (1.0, 1e12, False),
    "routed_scaling_factor": (0.0, 1e6, False),
    "rope_scaling.factor": (0.0, 1e6, False),
    "rope_scaling.beta_fast": (0.0, 1e6, False),
    "rope_scaling.beta_slow": (0.0, 1e6, False),
    "rope_scaling.mscale": (0.0, 1e3, True),
    "rope_scaling.mscale_all_dim": (0.0, 1e3, True),
}
MAX_TOKEN_ID = (1 << 31) - 1


@dataclass(frozen=True)
class RopeScaling:
    """YaRN settings (spec section 3). `factor` is s, the context extension."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class Config:
    """Every number the forward pass needs; field names are the config.json keys.

    The paper's symbols (sections 2.1-2.2, 4.2-4.3; docs/math.md), the field that holds each, and
    its value in the deepseek-v3 preset:

        d        hidden_size                            7168
        n_h      num_attention_heads                    128
        d_h      qk_nope_head_dim (keys, queries)       128
                 v_head_dim (values; the paper's d_h)   128
        d_h^R    qk_rope_head_dim                       64
        d_c      kv_lora_rank                           512
        d'_c     q_lora_rank (None: no query latent)    1536
        L        num_hidden_layers                      61
        N_s      n_shared_experts                       1
        N_r      n_routed_experts                       256
        K_r      num_experts_per_tok                    8
        M        topk_group (groups kept per token)     4, of n_group = 8 groups (nodes)
                 moe_intermediate_size (expert width)   2048
                 intermediate_size (dense FFN width)    18432, in the first_k_dense_replace = 3
        D        num_nextn_predict_layers               1
        V        vocab_size                             129280
        s        rope_scaling.factor                    40
        alpha    rope_scaling.beta_slow                 1
        beta     rope_scaling.beta_fast                 32
        sqrt(t)  m(s, rope_scaling.mscale_all_dim)      0.1 ln 40 + 1 = 1.3688879
                 routed_scaling_factor (not in eq. 13)  2.5
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    model_type: str = "deepseek_v3"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # Keys we carry through unchanged (quantization_config, torch_dtype, architectures, ...).
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """d_h + d_h^R: the per-head query/key width that sets the softmax scale."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def uses_bias(self) -> bool:
        """noaux_tc routing carries e_score_correction_bias (V3); V2 methods have none."""
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer: int) -> bool:
        """Layers from first_k_dense_replace on are MoE (every moe_layer_freq-th), MTP layers too."""
        if self.n_routed_experts == 0:
            return False
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    # ---- construction --------------------------------------------------------------------
    def __post_init__(self):
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        """Build from a parsed config.json; `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        bad = jsonfile.nonfinite_path(d)
        if bad is not None:
            raise ConfigError(f"{source}: {printable(bad)} must be a finite number, got NaN or "
                              "Infinity")
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {brief(model_type)} is not deepseek_v3 or "
                              "deepseek_v2")
        v2 = model_type == "deepseek_v2"
        rope_theta, rope_scaling = _read_rope(d, source)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling", "rope_theta"}
        kwargs = {}
        for name in known:
            if name in d:
                kwargs[name] = d.pop(name)
        for k in ("rope_scaling", "rope_parameters", "rope_theta"):
            d.pop(k, None)
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        # Fields with published defaults when absent (transformers' DeepseekV2/V3 defaults).
        kwargs.setdefault("n_group", 1)
        kwargs.setdefault("topk_group", 1)
        if v2:
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("norm_topk_prob", False)
        for name in required:
            if name not in kwargs:
                raise ConfigError(f"{source}: required field {name!r} is missing")
        if kwargs.get("n_group") is None:
            kwargs["n_group"] = 1
        if kwargs.get("topk_group") is None:
            kwargs["topk_group"] = 1
        if isinstance(kwargs.get("eos_token_id"), list):
            for t in kwargs["eos_token_id"]:
                _token_id(t, "eos_token_id", source)
            d["eos_token_id_list"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        return _build(cls, source, rope_theta, rope_scaling, d, kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Config":
        """Read a config.json: strict JSON (no NaN or Infinity, no duplicate keys), a regular
        file, then every field checked as from_dict does."""
        path = os.fspath(path)
        return cls.from_dict(jsonfile.load(path, ConfigError, allow_nonfinite=True),
                             source=printable(path))

    @classmethod
    def preset(cls, name: str) -> "Config":
        """`deepseek-v3` (the published config.json, exactly) or `tiny` (seconds on a CPU)."""
        if name not in PRESETS:
            raise ConfigError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]()

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- writing ---------------------------------------------------------------------------
    def to_dict(self, rope_form: str = "published") -> dict:
        """The config.json object. rope_form: "published" (rope_scaling + rope_theta, as
        DeepSeek ships it) or "transformers5" (rope_parameters with rope_type and rope_theta)."""
        out = {}
        out.update({k: v for k, v in self.extra.items() if k != "eos_token_id_list"})
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "rope_theta"):
                continue
            out[f.name] = getattr(self, f.name)
        if "eos_token_id_list" in self.extra:
            out["eos_token_id"] = self.extra["eos_token_id_list"]
        out["num_key_value_heads"] = self.extra.get("num_key_value_heads", self.num_attention_heads)
        out.setdefault("architectures", ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                                         else "DeepseekV2ForCausalLM"])
        rs = self.rope_scaling
        if rope_form == "published":
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None if rs is None else {
                "type": "yarn", **{k: v for k, v in dataclasses.asdict(rs).items()}}
        elif rope_form == "transformers5":
            params = {"rope_type": "default" if rs is None else "yarn", "rope_theta": self.rope_theta}
            if rs is not None:
                params.update(dataclasses.asdict(rs))
            out["rope_parameters"] = params
            out.pop("rope_scaling", None)
        else:
            raise ConfigError(f"rope_form {rope_form!r} is not 'published' or 'transformers5'")
        return dict(sorted(out.items()))

    def to_json(self, path: str | os.PathLike, rope_form: str = "published") -> None:
        """Write config.json atomically (temporary name, then rename)."""
        write_text(path, json.dumps(self.to_dict(rope_form), indent=2, allow_nan=False) + "\n",
                   ConfigError)


def _build(cls, source, rope_theta, rope_scaling, extra, kwargs):
    try:
        return cls(rope_theta=rope_theta, rope_scaling=rope_scaling, extra=extra, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def _read_rope(d: dict, source: str) -> tuple[float, RopeScaling | None]:
    """Both spellings of the rope settings -> (theta, YaRN settings or None)."""
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object")
        params = dict(params)
        kind = params.pop("rope_type", params.pop("type", "default"))
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        field_name = "rope_parameters.rope_theta"
    else:
        params = d.get("rope_scaling")
        theta = d.get("rope_theta", 10000.0)
        if params is None:
            return _number(theta, "rope_theta", source), None
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null")
        params = dict(params)
        kind = params.pop("type", params.pop("rope_type", "default"))
        field_name = "rope_theta"
    theta = _number(theta, field_name, source)
    if not isinstance(kind, str):
        raise ConfigError(f"{source}: rope type {brief(kind)} is not a string")
    if kind == "default":
        return theta, None
    if kind not in ("yarn", "deepseek_yarn"):
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (only 'yarn' or 'default')")
    for key in ("factor", "original_max_position_embeddings"):
        if params.get(key) is None:
            raise ConfigError(f"{source}: rope_scaling.{key} is required for yarn")
    if params.get("attention_factor") is not None:
        raise ConfigError(f"{source}: rope_scaling.attention_factor is not supported (DeepSeek's "
                          "YaRN derives the cos/sin factor from mscale and mscale_all_dim)")
    if params.get("truncate", True) is not True:
        raise ConfigError(f"{source}: rope_scaling.truncate false is not supported (DeepSeek's "
                          "YaRN floors and ceils the correction range)")
    names = {f.name for f in dataclasses.fields(RopeScaling)}
    kw = {k: v for k, v in params.items() if k in names and v is not None}
    for k, v in kw.items():
        _number(v, f"rope_scaling.{k}", source)
    return theta, RopeScaling(**kw)


def brief(v, width: int = 60) -> str:
    """A value from a file, for an error message: its repr, escaped, cut to `width` characters."""
    r = printable(repr(v))
    return r if len(r) <= width else r[:width - 3] + "..."


def _number(v, name, source):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{source}: {name} must be a number, got {brief(v)}")
    if not _finite(v):
        raise ConfigError(f"{source}: {name} must be finite, got {brief(v)}")
    return v


def _finite(v) -> bool:
    """math.isfinite, False for an integer too large for a float (10**400 from a file) rather
    than OverflowError."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _token_id(v, name, source=None):
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOKEN_ID:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{name} must be a token id (an integer from 0 to {MAX_TOKEN_ID}) "
                          f"or null, got {brief(v)}")


def _validate(c: Config) -> None:
    """Refuse fields of the wrong JSON type, out of range, or that don't fit together; each
    message names the field.  Types and bounds come first, so that nothing below (nor any
    caller) loops or allocates by a count that was never bounded."""
    def need_int(name, lo=1, v=None, hi=None):
        v = getattr(c, name) if v is None else v
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name} must be an integer, got {brief(v)}")
        hi = LIMITS[name] if hi is None else hi
        if not lo <= v <= hi:
            raise ConfigError(f"{name} must be from {lo} to {hi:,}, got {brief(v)}")

    def need_float(name, v):
        lo, hi, closed = FLOAT_RANGES[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{name} must be a number, got {brief(v)}")
        if not _finite(v) or not (lo <= v if closed else lo < v) or v > hi:
            interval = f"{'[' if closed else '('}{lo:g}, {hi:g}]"
            raise ConfigError(f"{name} must be a finite number in {interval}, got {brief(v)}")

    def need_choice(name, choices):
        v = getattr(c, name)
        if not isinstance(v, str) or v not in choices:
            raise ConfigError(f"{name} must be one of {choices}, got {brief(v)}")

    def need_bool(name):
        v = getattr(c, name)
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false (a JSON boolean), got {brief(v)}")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "max_position_embeddings", "moe_layer_freq", "n_group", "topk_group"):
        need_int(name)
    for name in ("first_k_dense_replace", "num_nextn_predict_layers", "n_routed_experts",
                 "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok"):
        need_int(name, lo=0)
    if c.q_lora_rank is not None:
        need_int("q_lora_rank")
    for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
        need_bool(name)
    need_choice("model_type", _MODEL_TYPES)
    need_choice("scoring_func", _SCORING)
    need_choice("topk_method", _TOPK_METHODS)
    need_choice("hidden_act", ("silu",))
    for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
        need_float(name, getattr(c, name))
    _token_id(c.bos_token_id, "bos_token_id")
    _token_id(c.eos_token_id, "eos_token_id")
    rs = c.rope_scaling
    if rs is not None:
        if not isinstance(rs, RopeScaling):
            raise ConfigError(f"rope_scaling must be YaRN settings or null, got {brief(rs)}")
        for f in dataclasses.fields(RopeScaling):
            if f.name == "original_max_position_embeddings":
                need_int(f"rope_scaling.{f.name}", v=rs.original_max_position_embeddings,
                         hi=LIMITS["max_position_embeddings"])
            else:
                need_float(f"rope_scaling.{f.name}", getattr(rs, f.name))
        if not rs.beta_fast > rs.beta_slow:
            raise ConfigError(f"rope_scaling: beta_fast ({rs.beta_fast}) must exceed beta_slow "
                              f"({rs.beta_slow}) > 0")
    tensors = c.num_layers_with_mtp * (3 * c.n_routed_experts + 32)  # an upper bound of the plan
    if tensors > MAX_TENSORS:
        raise ConfigError(f"num_hidden_layers + num_nextn_predict_layers ({c.num_layers_with_mtp}) x "
                          f"n_routed_experts ({c.n_routed_experts}) imply about {tensors:,} tensors, "
                          f"more than the {MAX_TENSORS:,} allowed")
    # -- relations between fields --
    if c.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim must be even (rotation acts on pairs), got {c.qk_rope_head_dim}")
    if c.attention_bias:
        raise ConfigError("attention_bias true is not supported (DeepSeek-V2/V3 projections have no bias)")
    if c.n_routed_experts:
        need_int("n_routed_experts")
        need_int("moe_intermediate_size")
        need_int("num_experts_per_tok")
        if c.n_routed_experts % c.n_group:
            raise ConfigError(f"n_routed_experts ({c.n_routed_experts}) is not divisible by "
                              f"n_group ({c.n_group})")
        if c.topk_group > c.n_group:
            raise ConfigError(f"topk_group ({c.topk_group}) is greater than n_group ({c.n_group})")
        kept = c.topk_group * (c.n_routed_experts // c.n_group) if c.topk_method != "greedy" \
            else c.n_routed_experts
        if c.num_experts_per_tok > kept:
            raise ConfigError(f"num_experts_per_tok ({c.num_experts_per_tok}) is more than the "
                              f"{kept} experts in the kept groups (topk_group x experts per group)")
        if c.topk_method == "noaux_tc" and c.n_routed_experts // c.n_group < 2 and c.n_group > 1:
            raise ConfigError("n_group: noaux_tc scores a group by its top-2 experts, so each group "
                              f"needs at least 2 experts ({c.n_routed_experts} experts / {c.n_group} groups)")


def _deepseek_v3() -> Config:
    text = resources.files("refimpl.presets").joinpath("deepseek-v3.json").read_text("utf-8")
    return Config.from_dict(json.loads(text), source="preset deepseek-v3")


def _tiny() -> Config:
    """Small enough for seconds on a CPU, yet every feature live: q-lora, one dense and two MoE
    layers, 4 expert groups (2 kept), YaRN active with an original context of 64 positions (so
    ordinary test sequences reach past it), one MTP module."""
    return Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=48,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=64, beta_fast=32.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=2560, num_nextn_predict_layers=1,
        extra={"architectures": ["DeepseekV3ForCausalLM"], "torch_dtype": "float32"},
    )


PRESETS = {"deepseek-v3": _deepseek_v3, "tiny": _tiny}
