"""Generate text from a Hugging Face checkpoint (optionally with a LoRA adapter).

    python scripts/generate.py --model PATH_OR_ID --prompt TEXT [--max-new-tokens N] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--adapter DIR]

`--prompt ""` starts from BOS. Repeat `--prompt` for a batch.
"""

import argparse

from jaxlora.errors import cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF hub id or local model folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder")
    p.add_argument(
        "--quant", default="none", choices=["none", "int8", "nf4"], help="quantize the base weights"
    )
    p.add_argument("--allow-pickle", action="store_true", help="permit loading pytorch_model.bin")
    return p.parse_args(argv)


@cli_main
def main() -> int:
    args = parse_args()
    from jaxlora.cli.generate import run_generation

    texts = run_generation(
        model=args.model,
        prompts=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        dtype=args.dtype,
        adapter=args.adapter,
        quant=args.quant,
        allow_pickle=args.allow_pickle,
    )
    for text in texts:
        print(text)
    return 0


if __name__ == "__main__":
    main()
