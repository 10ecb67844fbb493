"""Regenerate the quickstart's offline assets under `configs/quickstart/` (deterministic).

    python scripts/make_quickstart.py

- `model/`: a tiny Llama-architecture `config.json` and a character-level tokenizer. There are no
  weights: `configs/quickstart.yaml` sets `model.random_init: true`, so the base is random (seeded).
- `data/train.jsonl`: 3000 two-number addition problems in the `prompt_completion` format.
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+-=*/?:. abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n")


def model_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": len(SPECIALS) + len(CHARS),
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def save_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (BPE with no merges), BOS added in front, saved for transformers."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def make_data(n: int = 3000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def main() -> None:
    (ROOT / "model").mkdir(parents=True, exist_ok=True)
    (ROOT / "data").mkdir(parents=True, exist_ok=True)
    (ROOT / "model" / "config.json").write_text(json.dumps(model_config(), indent=2) + "\n")
    save_tokenizer(ROOT / "model")
    with open(ROOT / "data" / "train.jsonl", "w") as f:
        for row in make_data():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
