"""RoPE and the per-layer settings, read from a Hugging Face `config.json` for `config_from_hf`: RoPE theta
and scaling (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`), the layer types, sliding windows
and which layers rotate; also the end-of-sequence ids."""

import math

from jaxlora.errors import UserError
from jaxlora.models.family_defaults import hf_value

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_settings(hf: dict, head_dim: int) -> dict:
    """Read RoPE theta and scaling from either the 4.x or the 5.x config layout.

    5.x may hold one dict per layer type (Gemma 3: `full_attention` and `sliding_attention`); 4.x Gemma 3
    keeps the local base in `rope_local_base_freq`. Local layers must use default (unscaled) RoPE.
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    local = None
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        params = params.get("full_attention") or {}
    theta = params.get("rope_theta", hf_value(hf, "rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UserError(
            f"config.json: rope scaling type {rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    factor = params.get("partial_rotary_factor", hf_value(hf, "partial_rotary_factor"))
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
    if hf["model_type"] == "gemma3_text":
        if local is not None and (local.get("rope_type") or "default") != "default":
            raise UserError("config.json: only default RoPE is supported for Gemma 3's sliding layers")
        local_theta = (local or {}).get("rope_theta", hf_value(hf, "rope_local_base_freq"))
        out["rope_local_theta"] = float(local_theta)
    return out


def longrope(hf: dict, params: dict, rotary: int) -> dict:
    """Phi-3's longrope: short/long factors, the original length, the cos/sin factor (as transformers)."""
    orig = int(
        params.get("original_max_position_embeddings") or hf_value(hf, "original_max_position_embeddings")
    )
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


def eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def hf_layer_types(hf: dict, num_layers: int) -> list[str] | None:
    """`layer_types`, or the pattern a 4.x Gemma 2/3 config implies (Gemma 2: every other layer sliding
    from the first; Gemma 3: all but every `sliding_window_pattern`-th)."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    period = {"gemma2": 2, "gemma3_text": hf_value(hf, "sliding_window_pattern")}.get(hf["model_type"])
    if period is None:
        return None
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]


def sliding_windows(hf: dict, num_layers: int) -> tuple[int, ...]:
    window = hf_value(hf, "sliding_window")
    mt = hf["model_type"]
    gated = mt in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "smollm3")  # only with use_sliding_window
    if not window or (gated and not hf_value(hf, "use_sliding_window")):
        return (0,) * num_layers
    layer_types = hf_layer_types(hf, num_layers)
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
    if mt in ("qwen2", "qwen3"):
        first_full = hf_value(hf, "max_window_layers")
        return tuple(int(window) if i >= first_full else 0 for i in range(num_layers))
    if mt == "qwen2_moe":  # transformers 5's default layer_types: even layers below max_window_layers
        last = hf_value(hf, "max_window_layers")
        return tuple(int(window) if i % 2 == 0 and i < last else 0 for i in range(num_layers))
    if mt == "smollm3":  # transformers' default layer_types: sliding on the layers without RoPE
        return tuple(int(window) if r == "none" else 0 for r in layer_rope(hf, num_layers))
    return (int(window),) * num_layers


def layer_rope(hf: dict, num_layers: int) -> tuple[str, ...]:
    """Per layer "global", "local" (Gemma 3's sliding layers) or "none" (SmolLM3's no_rope_layers 0)."""
    mt = hf["model_type"]
    if mt == "gemma3_text":
        kinds = hf_layer_types(hf, num_layers)
        return tuple("local" if t == "sliding_attention" else "global" for t in kinds)
    if mt == "smollm3":
        every = hf_value(hf, "no_rope_layer_interval")
        flags = hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(num_layers)]
        if len(flags) != num_layers:
            raise UserError(f"config.json: no_rope_layers has {len(flags)} entries for {num_layers} layers")
        return tuple("global" if f else "none" for f in flags)
    return ("global",) * num_layers
