"""What a benchmark measures: `BenchSpec`, the named presets and suites, and the model each one trains.

Architectures are Hugging Face `config.json` files under `presets/<arch>/` (random weights), except
`stories260k`, the real model folder of the test assets. This module imports no framework: the PEFT
worker process must not load JAX (host memory is part of what it reports), nor jaxlora's data stack.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxlora.errors import UserError

RESULT_TAG = "JAXLORA_BENCH_RESULT "
FRAMEWORKS = ("jaxlora", "peft")
# jaxlora's train.remat policies; PEFT turns on gradient checkpointing for the ones in PEFT_CHECKPOINTING.
REMATS = ("none", "fast", "dots", "lean", "full", "minimal", "offload")
PEFT_CHECKPOINTING = ("dots", "full", "minimal", "offload")
# jaxlora.models.config.ATTENTION_IMPLS (not imported: that loads JAX); tests/test_benchmark.py compares.
ATTENTIONS = ("auto", "reference", "xla", "cudnn", "pallas")
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
REAL_MODEL = "stories260k"  # the arch trained from its real weights, found under --assets


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One measured configuration (what both frameworks run)."""

    name: str
    arch: str  # a folder of presets/, or "stories260k" (the real model in the test assets)
    batch: int
    seq: int
    dtype: str = "bfloat16"  # parameter and compute dtype
    quant: str = "none"  # none | int8 | nf4 (frozen base weights)
    r: int = 16
    alpha: float = 32.0
    remat: str = "lean"  # jaxlora train.remat; PEFT: gradient checkpointing for dots and full
    attention: str = "auto"  # jaxlora model.attention (ATTENTIONS); PEFT always uses sdpa
    packed: bool = False  # jaxlora only: rows of several examples (`packed_rows`), model packed=True
    loss_chunk: int = 1024
    lora_product: str = "auto"  # jaxlora DecoderConfig.lora_product: auto | plain | cpu (custom VJP)
    scan_layers: bool = True
    donate: bool = True
    prefetch: bool = True
    sync_every_step: bool = False
    steps: int = 10  # timed steps
    warmup: int = 3
    window: int = 5  # steps per timed window (one host sync per window)
    lr: float = 1e-4
    seed: int = 0
    threads: int = 0  # CPU only: cores (affinity) and intra-op threads of both frameworks; 0 = defaults
    model_path: str = ""  # the real model's folder when arch == "stories260k"
    profile_dir: str = ""  # jaxlora only: a jax.profiler trace of the timed steps

    def replace(self, **kw) -> "BenchSpec":
        return dataclasses.replace(self, **kw)


TINY = BenchSpec(
    "tiny", "tiny", batch=2, seq=64, dtype="float32", r=4, alpha=8.0, steps=4, warmup=2, window=2
)
PRESETS = {
    "tiny": TINY,
    "tiny-int8": TINY.replace(name="tiny-int8", quant="int8"),  # the 8B stand-ins of gpu_suite.sh --smoke
    "tiny-nf4": TINY.replace(name="tiny-nf4", quant="nf4"),
    "stories260k": BenchSpec(
        "stories260k", REAL_MODEL, batch=8, seq=256, dtype="float32", r=8, alpha=16.0, steps=20
    ),
    "llama-3.2-1b": BenchSpec("llama-3.2-1b", "llama-3.2-1b", batch=8, seq=2048),
    "llama-3.2-1b-8k": BenchSpec("llama-3.2-1b-8k", "llama-3.2-1b", batch=2, seq=8192),
    "llama-3.1-8b": BenchSpec("llama-3.1-8b", "llama-3.1-8b", batch=4, seq=2048),
    "llama-3.1-8b-int8": BenchSpec("llama-3.1-8b-int8", "llama-3.1-8b", batch=4, seq=2048, quant="int8"),
    "llama-3.1-8b-nf4": BenchSpec("llama-3.1-8b-nf4", "llama-3.1-8b", batch=4, seq=2048, quant="nf4"),
    "llama-3.1-8b-8k": BenchSpec("llama-3.1-8b-8k", "llama-3.1-8b", batch=1, seq=8192),
    "qwen2.5-0.5b": BenchSpec("qwen2.5-0.5b", "qwen2.5-0.5b", batch=8, seq=2048),
    "qwen2.5-0.5b-8k": BenchSpec("qwen2.5-0.5b-8k", "qwen2.5-0.5b", batch=2, seq=8192),
    # Mixture of experts (30.5B parameters, about 3B active per token); not in a suite yet, no GPU run.
    "qwen3-30b-a3b-nf4": BenchSpec("qwen3-30b-a3b-nf4", "qwen3-30b-a3b", batch=1, seq=2048, quant="nf4"),
    # gpt-oss-20b (20.9B parameters, 32 experts top-4, attention sinks); not in a suite yet, no GPU run.
    "gpt-oss-20b-nf4": BenchSpec("gpt-oss-20b-nf4", "gpt-oss-20b", batch=1, seq=2048, quant="nf4"),
    # Qwen3.5 dense (Gated DeltaNet and gated attention, 3:1), the 27B's and the 0.8B's shapes; no GPU run.
    "qwen3.5-27b-nf4": BenchSpec("qwen3.5-27b-nf4", "qwen3.5-27b", batch=1, seq=2048, quant="nf4"),
    "qwen3.5-0.8b": BenchSpec("qwen3.5-0.8b", "qwen3.5-0.8b", batch=8, seq=2048),
    # Qwen3.5-MoE (Qwen3.5-35B-A3B's text tower: 34.7B parameters, 256 experts top-8); no GPU run.
    "qwen3.5-35b-a3b-nf4": BenchSpec(
        "qwen3.5-35b-a3b-nf4", "qwen3.5-35b-a3b", batch=1, seq=2048, quant="nf4"
    ),
}
SUITES = {
    "cpu": ["tiny", "stories260k"],
    "gpu": [
        "llama-3.2-1b",
        "llama-3.2-1b-8k",
        "qwen2.5-0.5b",
        "qwen2.5-0.5b-8k",
        "llama-3.1-8b",
        "llama-3.1-8b-int8",
        "llama-3.1-8b-nf4",
        "llama-3.1-8b-8k",
    ],
}


def model_folder(spec: BenchSpec) -> tuple[Path, bool]:
    """(folder holding the architecture's config.json, random weights?)."""
    if spec.arch == REAL_MODEL:
        folder = Path(spec.model_path)
        if not (folder / "model.safetensors").is_file():
            raise UserError(
                f"stories260K not found at {spec.model_path!r}; pass --assets or set JAXLORA_ASSETS"
            )
        return folder, False
    folder = PRESETS_DIR / spec.arch
    if not (folder / "config.json").is_file():
        known = sorted(p.name for p in PRESETS_DIR.iterdir() if (p / "config.json").is_file())
        raise UserError(f"unknown architecture {spec.arch!r}; known: {REAL_MODEL}, {', '.join(known)}")
    return folder, True


def hf_config(spec: BenchSpec) -> dict:
    """The Hugging Face config.json of the spec's architecture."""
    return json.loads((model_folder(spec)[0] / "config.json").read_text())


def random_ids(spec: BenchSpec, vocab: int, n: int = 4) -> list[np.ndarray]:
    """`n` random token batches, int32 [1, B, T] (one micro-step each), the same for both frameworks."""
    rng = np.random.default_rng(spec.seed)
    return [rng.integers(0, vocab, (1, spec.batch, spec.seq)).astype(np.int32) for _ in range(n)]


def packed_rows(spec: BenchSpec) -> tuple[np.ndarray, np.ndarray]:
    """(positions, segment_ids), int32 [1, B, T]: each row holds whole examples back to back, as
    `data.packing` lays them out, of random lengths between T/8 and T/2 (the last one fills the row; no
    padding, so tokens/s stays comparable with unpacked rows). Positions restart at 0 in each example.
    The FLOP count still assumes whole causal rows: packed rows attend to fewer keys than it counts.
    """
    rng = np.random.default_rng(spec.seed + 1)
    seg = np.zeros((1, spec.batch, spec.seq), np.int32)
    pos = np.zeros_like(seg)
    low, high = max(1, spec.seq // 8), max(2, spec.seq // 2)
    for row in range(spec.batch):
        start, n = 0, 1
        while start < spec.seq:
            end = min(spec.seq, start + int(rng.integers(low, high + 1)))
            seg[0, row, start:end] = n
            pos[0, row, start:end] = np.arange(end - start)
            start, n = end, n + 1
    return pos, seg
