"""RoPE and the per-layer settings, read from a Hugging Face `config.json` (an `HFConfig`): RoPE theta and
scaling (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`), the layer types and the sliding windows
they imply; also the end-of-sequence ids. No family is named here: a family's readers
(`jaxlora.models.switches`) pass what differs (its default layer pattern, whether a window needs
`use_sliding_window`)."""

import math
from collections.abc import Callable

from jaxlora.errors import UserError
from jaxlora.models.family_defaults import HFConfig

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
SLIDING, FULL = "sliding_attention", "full_attention"  # the layer types of transformers' `layer_types`
# A family's layer types when config.json has no `layer_types`: (hf, num_layers) -> one type per layer.
Pattern = Callable[[HFConfig, int], list[str]]


def rope_parameters(hf: HFConfig) -> tuple[dict, dict | None]:
    """(the global layers' RoPE parameters, the local (sliding) layers' or None when not given apart).

    5.x may hold one dict per layer type (Gemma 3: `full_attention` and `sliding_attention`)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if FULL in params or SLIDING in params:
        return params.get(FULL) or {}, params.get(SLIDING) or {}
    return params, None


def rope_settings(hf: HFConfig, head_dim: int) -> dict:
    """Read RoPE theta and scaling from either the 4.x or the 5.x config layout."""
    params, _ = rope_parameters(hf)
    theta = params.get("rope_theta", hf.value("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UserError(
            f"config.json: rope scaling type {rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    factor = params.get("partial_rotary_factor", hf.value("partial_rotary_factor"))
    rotary = int(head_dim * factor)
    out = {"rope_theta": float(theta), "rope_type": rope_type, "rotary_dim": rotary}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        out["rope_high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
        out["rope_original_max_positions"] = int(params.get("original_max_position_embeddings", 8192))
    if rope_type == "longrope":
        out.update(longrope(hf, params, rotary))
    if rope_type == "yarn":
        out.update(yarn(hf, params))
    return out


def longrope(hf: HFConfig, params: dict, rotary: int) -> dict:
    """Phi-3's longrope: short/long factors, the original length, the cos/sin factor (as transformers)."""
    orig = int(params.get("original_max_position_embeddings") or hf.value("original_max_position_embeddings"))
    short, long = params["short_factor"], params["long_factor"]
    if len(short) != rotary // 2 or len(long) != rotary // 2:
        raise UserError(f"config.json: longrope short_factor/long_factor need {rotary // 2} values each")
    factor = params.get("factor") or hf["max_position_embeddings"] / orig
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return {
        "rope_original_max_positions": orig,
        "rope_short_factor": tuple(float(x) for x in short),
        "rope_long_factor": tuple(float(x) for x in long),
        "rope_attention_factor": float(attention),
    }


def yarn(hf: HFConfig, params: dict) -> dict:
    """YaRN: the interpolation factor, the original length, the ramp's rotation bounds and the cos/sin
    factor (given, else from `factor` and `mscale`/`mscale_all_dim`), read as transformers does."""
    longest = hf.value("max_position_embeddings")
    orig = int(params.get("original_max_position_embeddings") or longest)
    factor = float(params.get("factor") or longest / orig)
    attention = params.get("attention_factor")
    if attention is None:
        mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention = (
            _mscale(factor, mscale) / _mscale(factor, all_dim) if mscale and all_dim else _mscale(factor)
        )
    # transformers reads `truncate` at the top of `rope_parameters`, not inside a layer type's dict
    top = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return {
        "rope_factor": factor,
        "rope_original_max_positions": orig,
        "rope_attention_factor": float(attention),
        "rope_beta_fast": float(params.get("beta_fast") or 32),
        "rope_beta_slow": float(params.get("beta_slow") or 1),
        "rope_truncate": bool(top.get("truncate", True)),
    }


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def layer_types(hf: HFConfig, num_layers: int, pattern: Pattern | None = None) -> list[str] | None:
    """`layer_types`, else the family's `pattern` (None: no pattern, one kind of layer)."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    return None if pattern is None else pattern(hf, num_layers)


def every(period: int, num_layers: int) -> list[str]:
    """Every `period`-th layer global, the others sliding (Gemma 2: period 2; Gemma 3: 6)."""
    return [SLIDING if (i + 1) % period else FULL for i in range(num_layers)]


def sliding_windows(hf: HFConfig, num_layers: int, types: list[str] | None, gated: bool = False):
    """Per layer: `sliding_window` on the sliding layers of `types` (every layer when None), 0 elsewhere;
    all 0 without a window, or with `gated` (the Qwens, SmolLM3) unless `use_sliding_window` is set."""
    window = hf.value("sliding_window")
    if not window or (gated and not hf.value("use_sliding_window")):
        return (0,) * num_layers
    if types:
        return tuple(int(window) if t == SLIDING else 0 for t in types)
    return (int(window),) * num_layers
