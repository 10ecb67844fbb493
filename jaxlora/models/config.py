"""`DecoderConfig`: the one set of switches every supported decoder family is read into.

Built from a Hugging Face `config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
`rope_parameters`), never from a preset table.
"""

import dataclasses
import json
from pathlib import Path

from jaxlora.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")  # see jaxlora.models.attention
REMAT_POLICIES = ("none", "lean", "dots", "full")  # what each keeps: `jaxlora.models.decoder.REMAT`
LORA_PRODUCTS = ("plain", "cpu", "auto")  # see DecoderConfig.lora_product


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture switches plus run-time choices (attention kernel, compute dtype, remat).

    Hashable, so it is passed to jitted functions as a static argument.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    # "rms" (Llama family) or "layer" (GPT-2).
    norm: str = "rms"
    # "silu" gated MLP (gate/up/down) or "gelu_new" plain MLP (GPT-2).
    activation: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # GPT-2 switches: learned absolute positions, fused c_attn, Conv1D layout.
    learned_positions: bool = False
    fused_qkv: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    # Per layer: 0 = full attention, w > 0 = attend to the last w positions only.
    sliding_windows: tuple[int, ...] = ()
    # Gemma 2's attention-logit soft-capping: scores -> c * tanh(scores / c); 0 = none.
    attn_logit_softcap: float = 0.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Run-time choices, not part of the checkpoint.
    compute_dtype: str = "float32"
    # One of ATTENTION_IMPLS; "auto" is resolved per case at trace time (jaxlora.models.attention.choose).
    attention: str = "auto"
    # True when training rows may hold several packed examples (data.packing): cuDNN then cannot run.
    # False: one example per row, right-padded (segment ids 1 then 0).
    packed: bool = True
    # What the backward pass keeps and what it recomputes; one of REMAT_POLICIES.
    remat: str = "lean"
    # The LoRA product (x @ A) @ B: "plain" under autodiff, "cpu" with the backward pass written for
    # XLA:CPU (`jaxlora.models.lora_product`), "auto" = "cpu" when JAX runs on the CPU, else "plain".
    lora_product: str = "auto"
    # False: a Python loop over the layers instead of `lax.scan` (compile time grows with depth).
    scan_layers: bool = True

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_runtime(self, **kw) -> "DecoderConfig":
        """A validated copy with run-time fields changed (compute_dtype, attention, packed, remat...)."""
        cfg = dataclasses.replace(self, **kw)
        if cfg.attention not in ATTENTION_IMPLS:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {cfg.attention!r}")
        if cfg.remat not in REMAT_POLICIES:
            raise UserError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {cfg.remat!r}")
        if cfg.lora_product not in LORA_PRODUCTS:
            raise UserError(
                f"lora_product must be one of {', '.join(LORA_PRODUCTS)}, got {cfg.lora_product!r}"
            )
        if cfg.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"compute_dtype must be float32 or bfloat16, got {cfg.compute_dtype!r}")
        return cfg


def _rope_settings(hf: dict) -> dict:
    """Read RoPE theta and scaling from either the 4.x or the 5.x config layout."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UserError(
            f"config.json: rope scaling type {rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    out = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        out["rope_high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
        out["rope_original_max_positions"] = int(params.get("original_max_position_embeddings", 8192))
    return out


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def _sliding_windows(hf: dict, num_layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window")
    mt = hf["model_type"]
    if not window or (mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False)):
        return (0,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
    if mt in ("qwen2", "qwen3"):
        first_full = hf.get("max_window_layers", num_layers)
        return tuple(int(window) if i >= first_full else 0 for i in range(num_layers))
    return (int(window),) * num_layers


def config_from_hf(hf: dict) -> DecoderConfig:
    """Map a Hugging Face `config.json` dict to a `DecoderConfig`."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"config.json: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    common = dict(
        model_type=mt,
        vocab_size=hf["vocab_size"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
    if mt == "gpt2":
        d, n = hf["n_embd"], hf["n_head"]
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"config.json: GPT-2 activation_function {act!r} is not supported; use gelu_new")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UserError(
                "config.json: GPT-2 scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported"
            )
        layers = hf["n_layer"]
        return DecoderConfig(
            **common,
            hidden_size=d,
            intermediate_size=hf.get("n_inner") or 4 * d,
            num_layers=layers,
            num_heads=n,
            num_kv_heads=n,
            head_dim=d // n,
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            norm="layer",
            activation="gelu_new",
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            learned_positions=True,
            fused_qkv=True,
            sliding_windows=(0,) * layers,
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"config.json: hidden_act {act!r} is not supported for {mt}; supported: silu")
    heads = hf["num_attention_heads"]
    layers = hf["num_hidden_layers"]
    return DecoderConfig(
        **common,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=mt == "qwen2" or hf.get("attention_bias", False),
        o_bias=mt != "qwen2" and hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        qk_norm=mt == "qwen3",
        sliding_windows=_sliding_windows(hf, layers),
        **_rope_settings(hf),
    )


def read_hf_config(folder: Path) -> dict:
    """Read `config.json` from a model folder, with a one-line error when it is missing or broken."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json found; is this a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err})") from None
