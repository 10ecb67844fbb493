"""MXFP4 checkpoints for the tests (tests/test_mxfp4.py): an encoder to the hub's `X_blocks` / `X_scales`
(transformers' own quantizer needs a Triton kernel from the hub, so the test encodes here), a rewrite of a
saved float checkpoint with some tensors packed, and transformers' dequantization as the reference."""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

# e2m1 magnitudes by code (the sign is bit 3)
_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def encode_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks uint8 [..., B, A / 32, 16] and scales uint8 [..., B, A / 32] of a float w [..., A, B] (the
    layout after loading; A a multiple of 32): blocks of 32 along A share the scale 2 ** (floor(log2 absmax)
    - 2), and each value rounds to the nearest e2m1 value (6 at most), as the OCP MX spec does."""
    t = np.swapaxes(np.asarray(w, np.float64), -1, -2)  # [..., B, A]
    t = t.reshape(*t.shape[:-1], t.shape[-1] // 32, 32)
    amax = np.abs(t).max(axis=-1)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.floor(np.log2(amax)) - 2, -127)
    exp = np.clip(exp, -127, 127)
    scaled = t / np.exp2(exp)[..., None]
    code = np.abs(np.abs(scaled)[..., None] - _MAGNITUDES).argmin(axis=-1)
    code = (code | np.where(scaled < 0, 8, 0)).astype(np.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    # C order: safetensors' numpy writer stores the buffer as it lies in memory
    return np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(exp + 127, np.uint8)


def transformers_dequantized(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' own dequantization (`convert_moe_packed_tensors`), in float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    return out.numpy()


def write_mxfp4_checkpoint(src: Path, dst: Path, packed: dict[str, np.ndarray], drop: str = "") -> dict:
    """Copy the float checkpoint `src` to `dst` with each `packed` tensor X (name -> float array in the
    loaded layout) stored as X_blocks / X_scales in its place, the tensors whose names contain `drop` (if
    given) left out, and an mxfp4 quantization_config in config.json, as on the hub. Returns X ->
    transformers' dequantization of it."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.float().numpy()
        for k, v in load_file(src / "model.safetensors").items()
        if k not in packed and not (drop and drop in k)
    }
    reference = {}
    for name, w in packed.items():
        blocks, scales = encode_mxfp4(w)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        reference[name] = transformers_dequantized(blocks, scales)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (dst / "config.json").write_text(json.dumps(conf, indent=2))
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, dst / extra)
    return reference


def _gpt_oss_config(**sizes):
    from transformers import GptOssConfig

    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
        },
    )
    return GptOssConfig(**{**base, **sizes})


def write_random_gpt_oss_mxfp4(folder: Path, **sizes) -> None:
    """A random gpt-oss checkpoint as the hub has it (experts as random MXFP4 pairs, the rest float32, an
    mxfp4 quantization_config), made with numpy: no torch model is built, so it can be larger than the
    parity models. `sizes` override the tiny config's (num_hidden_layers, hidden_size, ...)."""
    cfg = _gpt_oss_config(**sizes)
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.normal(0, 0.02, shape).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(cfg.vocab_size, D), "model.norm.weight": np.ones(D, np.float32)}
    t["lm_head.weight"] = normal(cfg.vocab_size, D)
    linears = {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(D, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(D, np.float32)
        for name, (out, inp) in linears.items():
            t[f"{p}self_attn.{name}.weight"], t[f"{p}self_attn.{name}.bias"] = normal(out, inp), normal(out)
        t[p + "self_attn.sinks"] = normal(cfg.num_attention_heads)
        t[p + "mlp.router.weight"], t[p + "mlp.router.bias"] = normal(E, D), normal(E)
        for name, (fan_in, fan_out) in {"gate_up_proj": (D, 2 * F), "down_proj": (F, D)}.items():
            x = f"{p}mlp.experts.{name}"  # random codes at the scales 2^-9 .. 2^-6
            t[x + "_blocks"] = rng.integers(0, 256, (E, fan_out, fan_in // 32, 16), dtype=np.uint8)
            t[x + "_scales"] = rng.integers(118, 122, (E, fan_out, fan_in // 32), dtype=np.uint8)
            t[x + "_bias"] = normal(E, fan_out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    conf = {**cfg.to_dict(), "quantization_config": {"quant_method": "mxfp4"}}
    (folder / "config.json").write_text(json.dumps(conf, indent=2))


def make_gpt_oss(folder: Path, seed: int = 0):
    """A tiny random `GptOssForCausalLM` (4 experts, top-2, hidden 64, expert width 96, a sliding then a
    full layer, YaRN), saved to `folder`; returns the torch model (eval, float32). Hidden and width are
    multiples of 32 (MXFP4's block) and differ, so a swapped axis cannot pass."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.hf_tiny import randomize_

    torch.manual_seed(seed)
    config = _gpt_oss_config()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model


def pack_saved_experts(hf, root: Path, drop: str = "") -> tuple[Path, Path]:
    """A tiny MoE model `hf` saved to `root / "float"` -> `root / "packed"` (its experts' fused
    gate_up_proj and down_proj rewritten as MXFP4, tensors containing `drop` left out) and `root / "ref"`
    (float, the experts holding transformers' dequantization of those blocks). `hf`'s experts are set to
    the same dequantized values, and the float folder is removed."""
    params = {
        f"model.layers.{i}.mlp.experts.{proj}": getattr(layer.mlp.experts, proj)
        for i, layer in enumerate(hf.model.layers)
        for proj in ("gate_up_proj", "down_proj")
    }
    floats = {k: p.detach().numpy().copy() for k, p in params.items()}
    deq = write_mxfp4_checkpoint(root / "float", root / "packed", floats, drop)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(torch.from_numpy(deq[k]))
    hf.save_pretrained(root / "ref")
    shutil.rmtree(root / "float")
    return root / "packed", root / "ref"
