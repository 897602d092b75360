"""MPTConfig: the model's shape and options, with llm-foundry's and transformers' field names.

A frozen (hashable) dataclass with three nested parts, as in llm-foundry: `attn_config`,
`ffn_config` and `init_config`. `MPTConfig.from_dict` reads either config.json form (transformers'
`MptConfig`, or llm-foundry's remote-code `MPTConfig`); `to_dict(form=...)` writes either.
Validation names the offending value. Presets: `MPTConfig.preset("7b")` etc. for llm-foundry's
sizes, `MPTConfig.mpt_7b()` for MPT-7B as released.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from mpt_jax import storage

ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")
FFN_TYPES = ("mptmlp", "mptglu")
NORM_TYPES = ("low_precision_layernorm", "layernorm", "low_precision_rmsnorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu", "silu")
# Weight quantization of a checkpoint (model/quant.py): "int8" = weight-only int8, symmetric
# absmax scales per output channel, on every matrix (the blocks' and the embeddings).
QUANT_MODES = ("int8",)
# The parameters it stores as int8 (pure-dict paths; a model has those its config gives it),
# each with a float32 scale sibling `<name>_scale`: True for dense weights (float [in, out],
# int8 [out, in], a scale per output), False for embeddings (rows kept, a scale per row).
QUANTIZED_MATRICES = {
    ("blocks", "attn", "Wqkv"): True,
    ("blocks", "attn", "out_proj"): True,
    ("blocks", "ffn", "up_proj"): True,
    ("blocks", "ffn", "down_proj"): True,
    ("blocks", "ffn", "gate_proj"): True,
    ("wte",): False,
    ("lm_head",): False,
}


def scale_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """The pure-dict path of the scales of quantized parameter `path`."""
    return path[:-1] + (f"{path[-1]}_scale",)


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    attn_type: str = "multihead_attention"
    attn_pdrop: float = 0.0
    attn_impl: str = "flash"  # informational in PyTorch; our kernel is chosen at run time
    qk_ln: bool = False
    qk_gn: bool = False
    fused_qkv: bool = True
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    attn_uses_sequence_id: bool = False
    alibi: bool = True
    alibi_bias_max: float = 8
    kv_n_heads: int = 1  # used by grouped_query_attention only
    # Options of llm-foundry / transformers that this port does not implement; kept so that a
    # config.json round-trips, and rejected by validation when set.
    prefix_lm: bool = False
    sliding_window_size: int = -1
    rope: bool = False


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    ffn_type: str = "mptmlp"
    ffn_act_fn: str = "gelu"  # exact (erf) GELU, as torch.nn.GELU(approximate='none')
    ffn_hidden_size: int | None = None


@dataclasses.dataclass(frozen=True)
class InitConfig:
    name: str = "kaiming_normal_"
    fan_mode: str = "fan_in"
    init_nonlinearity: str = "relu"
    init_div_is_residual: bool = True
    emb_init_std: float | None = None
    emb_init_uniform_lim: float | None = None
    init_std: float | None = None
    init_gain: float = 0.0


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class MPTConfig:
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True  # ignored (no wpe) when attn_config.alibi, as in llm-foundry
    attn_config: AttnConfig = AttnConfig()
    ffn_config: FFNConfig = FFNConfig()
    init_config: InitConfig = InitConfig()
    logit_scale: float | str | None = None
    no_bias: bool = True
    embedding_fraction: float = 1.0
    norm_type: str = "low_precision_layernorm"
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    use_cache: bool = False
    init_device: str = "cpu"
    # Special token ids of config.json (transformers' PretrainedConfig keys), carried through
    # conversion: HF's generate stops at eos_token_id. None: not set. A list becomes a tuple.
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | tuple[int, ...] | None = None
    # How the weights are stored (not an llm-foundry key): None = floating point, else one of
    # QUANT_MODES. Our checkpoints record it in config.json; it changes parameter shapes and
    # dtypes (model/quant.py), not what the model computes up to rounding.
    quantization: str | None = None

    def __post_init__(self):
        self.validate()

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        t = self.attn_config.attn_type
        if t == "multihead_attention":
            return self.n_heads
        if t == "multiquery_attention":
            return 1
        return self.attn_config.kv_n_heads

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_config.ffn_hidden_size is not None:
            return self.ffn_config.ffn_hidden_size
        return int(self.d_model * self.expansion_ratio)

    @property
    def use_wpe(self) -> bool:
        return self.learned_pos_emb and not self.attn_config.alibi

    @property
    def logit_scale_value(self) -> float | None:
        if self.logit_scale is None:
            return None
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return float(self.logit_scale)

    def num_params(self) -> int:
        """Parameter count, as `sum(p.numel())` over the PyTorch model (tied weights once)."""
        d, f, v = self.d_model, self.ffn_hidden_size, self.vocab_size
        hd, kv = self.head_dim, self.kv_n_heads
        bias = 0 if self.no_bias else 1
        qkv = d * (d + 2 * kv * hd) + bias * (d + 2 * kv * hd)
        out = d * d + bias * d
        n_mats = 3 if self.ffn_config.ffn_type == "mptglu" else 2
        ffn = n_mats * d * f + bias * ((n_mats - 1) * f + d)
        norm = d * (1 if self.norm_type.endswith("rmsnorm") or self.no_bias else 2)
        qk = 0
        if self.attn_config.qk_ln or self.attn_config.qk_gn:
            qk_dims = (d, kv * hd) if self.attn_config.qk_ln else (hd, hd)
            qk = sum(x * (1 if self.norm_type.endswith("rmsnorm") or self.no_bias else 2)
                     for x in qk_dims)
        layer = qkv + out + ffn + 2 * norm + qk
        total = v * d + self.n_layers * layer + norm
        if self.use_wpe:
            total += self.max_seq_len * d
        if not self.tie_word_embeddings:
            total += v * d
        return total

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        a, f = self.attn_config, self.ffn_config
        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if a.attn_type not in ATTN_TYPES:
            raise ValueError(f"unknown attn_config.attn_type {a.attn_type!r}; expected {ATTN_TYPES}")
        if a.attn_type == "grouped_query_attention":
            if a.kv_n_heads <= 0 or self.n_heads % a.kv_n_heads:
                raise ValueError(
                    f"n_heads ({self.n_heads}) must be divisible by attn_config.kv_n_heads "
                    f"({a.kv_n_heads})"
                )
        if a.qk_ln and a.qk_gn:
            raise ValueError("attn_config.qk_ln and attn_config.qk_gn are mutually exclusive")
        if a.clip_qkv is not None and a.clip_qkv <= 0:
            raise ValueError(f"attn_config.clip_qkv must be positive, got {a.clip_qkv!r}")
        if not a.fused_qkv:
            raise ValueError("attn_config.fused_qkv=False is not supported (MPT fuses Wqkv)")
        if a.prefix_lm:
            raise ValueError("attn_config.prefix_lm=True is not supported")
        if a.rope:
            raise ValueError("attn_config.rope=True is not supported (MPT uses ALiBi)")
        if a.sliding_window_size != -1:
            raise ValueError(
                f"attn_config.sliding_window_size={a.sliding_window_size} is not supported"
            )
        if not 0.0 <= a.attn_pdrop < 1.0:
            raise ValueError(f"attn_config.attn_pdrop must be in [0, 1), got {a.attn_pdrop}")
        for name in ("resid_pdrop", "emb_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if f.ffn_type not in FFN_TYPES:
            raise ValueError(f"unknown ffn_config.ffn_type {f.ffn_type!r}; expected {FFN_TYPES}")
        if f.ffn_act_fn not in ACTIVATIONS:
            raise ValueError(
                f"unknown ffn_config.ffn_act_fn {f.ffn_act_fn!r}; expected {ACTIVATIONS}"
            )
        if self.ffn_hidden_size <= 0:
            raise ValueError(f"ffn hidden size must be positive, got {self.ffn_hidden_size}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"unknown norm_type {self.norm_type!r}; expected {NORM_TYPES}")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise ValueError(
                f"logit_scale must be a number, None or 'inv_sqrt_d_model', got {self.logit_scale!r}"
            )
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise ValueError(f"embedding_fraction must be in (0, 1], got {self.embedding_fraction}")
        if self.quantization is not None and self.quantization not in QUANT_MODES:
            raise ValueError(f"quantization {self.quantization!r} is not supported; supported: "
                             f"{', '.join(QUANT_MODES)} (weight-only, per output channel)")
        if self.init_config.fan_mode not in ("fan_in", "fan_out"):
            raise ValueError(f"unknown init_config.fan_mode {self.init_config.fan_mode!r}")

    def replace(self, **changes) -> "MPTConfig":
        return dataclasses.replace(self, **changes)

    # ---- config.json ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MPTConfig":
        """Reads transformers' MptConfig or llm-foundry's MPTConfig dict (config.json)."""
        d = dict(d)
        if d.get("model_type", "mpt") != "mpt":
            raise ValueError(f"model_type is {d['model_type']!r}, expected 'mpt'")
        top_fields = {fl.name for fl in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key in ("layer_norm_epsilon", "norm_eps"):
            if d.get(key) is not None:
                kwargs["norm_eps"] = float(d[key])
        attn = dict(d.get("attn_config") or {})
        ffn = dict(d.get("ffn_config") or {})
        init = dict(d.get("init_config") or {})
        for key, value in d.items():
            if key in top_fields and key not in ("attn_config", "ffn_config", "init_config",
                                                 "norm_eps"):
                kwargs[key] = value
        for key in TOKEN_ID_KEYS:
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        if "expansion_ratio" in kwargs and float(kwargs["expansion_ratio"]).is_integer():
            kwargs["expansion_ratio"] = int(kwargs["expansion_ratio"])
        act = ffn.pop("ffn_act_fn", None)
        if isinstance(act, dict):
            name = act.get("name", "gelu")
            if name == "gelu" and act.get("approximate", "none") != "none":
                raise ValueError(f"ffn_config.ffn_act_fn {act} (tanh GELU) is not supported")
            ffn["ffn_act_fn"] = name
        elif isinstance(act, str):
            ffn["ffn_act_fn"] = act
        if ffn.get("ffn_type") == "te_ln_mlp":
            raise ValueError("ffn_config.ffn_type 'te_ln_mlp' (TransformerEngine) is not supported")
        kwargs["attn_config"] = _known(AttnConfig, attn, "attn_config")
        kwargs["ffn_config"] = _known(FFNConfig, ffn, "ffn_config")
        kwargs["init_config"] = _known(InitConfig, init, "init_config")
        return cls(**kwargs)

    def to_dict(self, form: str = "foundry") -> dict[str, Any]:
        """`form='hf'`: transformers' native MptConfig (only keys it knows); `'foundry'`:
        llm-foundry's remote-code MPTConfig (every option)."""
        if form not in ("hf", "foundry"):
            raise ValueError(f"form must be 'hf' or 'foundry', got {form!r}")
        a = dataclasses.asdict(self.attn_config)
        out: dict[str, Any] = {
            "model_type": "mpt",
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "expansion_ratio": self.expansion_ratio,
            "max_seq_len": self.max_seq_len,
            "vocab_size": self.vocab_size,
            "resid_pdrop": self.resid_pdrop,
            "emb_pdrop": self.emb_pdrop,
            "learned_pos_emb": self.learned_pos_emb,
            "logit_scale": self.logit_scale,
            "no_bias": self.no_bias,
            "embedding_fraction": self.embedding_fraction,
            "norm_type": self.norm_type,
            "layer_norm_epsilon": self.norm_eps,
            "use_cache": self.use_cache,
            "init_device": self.init_device,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        for key in TOKEN_ID_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        if form == "hf":
            out["architectures"] = ["MptForCausalLM"]
            out["attn_config"] = {
                k: a[k] for k in ("attn_type", "attn_pdrop", "attn_impl", "clip_qkv",
                                  "softmax_scale", "prefix_lm", "qk_ln",
                                  "attn_uses_sequence_id", "alibi", "alibi_bias_max")
            }
            hf_attn = out["attn_config"]
            hf_attn["attn_impl"] = "torch"
            # transformers' strict MptAttentionConfig wants ints here when the value is whole.
            for k in ("attn_pdrop", "alibi_bias_max"):
                if float(hf_attn[k]).is_integer():
                    hf_attn[k] = int(hf_attn[k])
            for k in ("clip_qkv", "softmax_scale"):
                if hf_attn[k] is not None:
                    hf_attn[k] = float(hf_attn[k])
            return out
        out["architectures"] = ["MPTForCausalLM"]
        out["norm_eps"] = self.norm_eps
        if self.quantization is not None:
            out["quantization"] = self.quantization
        out["attn_config"] = a
        f = dataclasses.asdict(self.ffn_config)
        f["ffn_act_fn"] = ({"name": "gelu", "approximate": "none"}
                           if self.ffn_config.ffn_act_fn == "gelu"
                           else {"name": self.ffn_config.ffn_act_fn})
        if f["ffn_hidden_size"] is None:
            del f["ffn_hidden_size"]
        out["ffn_config"] = f
        out["init_config"] = dataclasses.asdict(self.init_config)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "MPTConfig":
        with open(path) as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_json_file(self, path: str | os.PathLike, form: str = "foundry") -> None:
        storage.write_atomic(str(path), json.dumps(self.to_dict(form), indent=2,
                                                   sort_keys=True) + "\n")

    def _hf_native_gaps(self) -> list[tuple[str, str, dict]]:
        """Where transformers' native MptForCausalLM computes something other than this config:
        (what, the config section, the values native MPT uses instead). It always applies
        ALiBi with alibi_bias_max 8, multi-head attention without qk norms, a bias-free GELU MLP
        of 4 * d_model, bias-free LayerNorm and no logit scale; it honours d_model, n_heads,
        n_layers, vocab_size, max_seq_len, layer_norm_epsilon, softmax_scale, clip_qkv and
        tie_word_embeddings."""
        a, f = self.attn_config, self.ffn_config
        gaps = []
        if a.attn_type != "multihead_attention":
            gaps.append((f"attn_type={a.attn_type}", "attn", {"attn_type": "multihead_attention"}))
        if a.qk_ln or a.qk_gn:
            gaps.append(("qk_ln/qk_gn", "attn", {"qk_ln": False, "qk_gn": False}))
        if not a.alibi:
            gaps.append(("alibi=False (native MPT always applies ALiBi)", "attn", {"alibi": True}))
        if a.alibi_bias_max != 8:
            gaps.append((f"alibi_bias_max={a.alibi_bias_max} (native MPT always uses 8)", "attn",
                         {"alibi_bias_max": 8}))
        if a.attn_uses_sequence_id:
            gaps.append(("attn_uses_sequence_id", "attn", {"attn_uses_sequence_id": False}))
        if f.ffn_type != "mptmlp" or f.ffn_act_fn != "gelu":
            gaps.append((f"ffn {f.ffn_type}/{f.ffn_act_fn}", "ffn",
                         {"ffn_type": "mptmlp", "ffn_act_fn": "gelu"}))
        if self.ffn_hidden_size != 4 * self.d_model:
            gaps.append((f"ffn hidden size {self.ffn_hidden_size} != 4*d_model", "top",
                         {"expansion_ratio": 4}))
            gaps.append(("", "ffn", {"ffn_hidden_size": None}))
        if not self.no_bias:
            gaps.append(("no_bias=False", "top", {"no_bias": True}))
        if self.logit_scale is not None:
            gaps.append((f"logit_scale={self.logit_scale}", "top", {"logit_scale": None}))
        if self.norm_type not in ("low_precision_layernorm", "layernorm"):
            gaps.append((f"norm_type={self.norm_type}", "top", {"norm_type": "layernorm"}))
        if self.embedding_fraction != 1.0:
            gaps.append(("embedding_fraction", "top", {"embedding_fraction": 1.0}))
        return gaps

    def hf_native_problems(self) -> list[str]:
        """What transformers' native MptForCausalLM cannot express (empty = loadable)."""
        return [what for what, _, _ in self._hf_native_gaps() if what]

    def as_hf_native(self) -> tuple["MPTConfig", list[str]]:
        """The model native MptForCausalLM builds from this config (what a config.json of
        transformers' own, without llm-foundry's auto_map, means), and the options it ignores."""
        top, attn, ffn = {}, {}, {}
        for _, section, changes in self._hf_native_gaps():
            {"top": top, "attn": attn, "ffn": ffn}[section].update(changes)
        cfg = self.replace(attn_config=dataclasses.replace(self.attn_config, **attn),
                           ffn_config=dataclasses.replace(self.ffn_config, **ffn), **top)
        return cfg, self.hf_native_problems()

    # ---- presets ------------------------------------------------------------------------
    @classmethod
    def preset(cls, size: str, **overrides) -> "MPTConfig":
        """llm-foundry's pretraining sizes (yamls/pretrain/mpt-*.yaml): ALiBi, no bias, tied."""
        if size not in PRESETS:
            raise ValueError(f"unknown MPT size {size!r}; expected one of {tuple(PRESETS)}")
        kwargs = dict(PRESETS[size])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def mpt_7b(cls, **overrides) -> "MPTConfig":
        """MPT-7B as released (mosaicml/mpt-7b config.json): 6,649,286,656 parameters."""
        return cls.preset("7b", **overrides)


def _known(kind, d: dict, where: str):
    fields = {fl.name for fl in dataclasses.fields(kind)}
    # Unknown keys from newer llm-foundry versions that do not change the math are dropped;
    # those that would change it are rejected by name.
    changes_math = {"rope_theta", "rope_impl", "rope_dail_config", "rope_hf_config",
                    "flex_attn_mod_list", "attn_logit_softcapping", "fc_type"}
    bad = sorted(k for k in d if k not in fields and k in changes_math and d[k])
    if bad:
        raise ValueError(f"{where}: unsupported option(s) {bad}")
    return kind(**{k: v for k, v in d.items() if k in fields})


def _size(d_model, n_heads, n_layers, vocab_size=50368, max_seq_len=2048):
    return dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, vocab_size=vocab_size,
                max_seq_len=max_seq_len, expansion_ratio=4, no_bias=True,
                attn_config=AttnConfig(alibi=True, alibi_bias_max=8),
                norm_type="low_precision_layernorm")


PRESETS: dict[str, dict] = {
    "125m": _size(768, 12, 12),
    "350m": _size(1024, 16, 24),
    "760m": _size(1536, 12, 24),
    "1b": _size(2048, 16, 24),
    "3b": _size(2560, 20, 32),
    "7b": _size(4096, 32, 32, vocab_size=50432),
    "13b": _size(5120, 40, 40),
    "30b": _size(7168, 64, 48, max_seq_len=8192),
}
