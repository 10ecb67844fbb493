"""`run_generation` and `chat`: what `scripts/generate.py` (and `jaxlora generate`) does, as library
functions; `main` is that command line.

(`jaxlora.models.generate` is the decoding itself; this module adds loading, adapters, the prompt format
of training (`jaxlora.train.samples.render_prompt`) and argument checks.)
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml
from safetensors import SafetensorError, safe_open

from jaxlora.data.templates import CHAT_TEMPLATES, resolve_chat_template
from jaxlora.errors import UserError
from jaxlora.lora import lora_scale
from jaxlora.lora.tokens import with_embeddings
from jaxlora.models import load_model, load_tokenizer
from jaxlora.models.generate import generate, generate_text
from jaxlora.peft import load_peft_adapter
from jaxlora.quant import make_quantizer
from jaxlora.train.samples import PROMPT_FORMATS, encode_prompt, render_prompt

USAGE = """Generate text from a Hugging Face checkpoint (optionally with a LoRA adapter).

    generate --model PATH_OR_ID --prompt TEXT [--format alpaca|chat|raw] [--adapter DIR_OR_RUN]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P]
        [--repetition-penalty R] [--seed S]
    generate --model PATH_OR_ID --chat [--chat-template chatml] [--adapter DIR_OR_RUN] < turns.txt

`--prompt ""` starts from BOS. Repeat `--prompt` for a batch. With --format raw (the default) each prompt
is printed with its completion; alpaca and chat render the prompt as training did and print the answer.
`--adapter` takes an adapter folder or a training run's folder (then --format follows the run's data).
`--chat` reads one user turn per line (from the terminal or a pipe) until end of input or /exit.
Sampling is transformers' (the same names): --temperature 0 is greedy; --top-k, --top-p, then --min-p
(keep tokens at least P times as likely as the best); --repetition-penalty (1 = off, greedy too) makes the
prompt's tokens and those generated so far less likely.
"""


def resolve_adapter(path: str) -> tuple[Path, dict | None]:
    """An adapter folder, or a training run's folder (its `adapter/`): (the adapter folder, the run's
    config.yaml as a dict when a run folder was given, else None)."""
    folder = Path(path).expanduser()
    if (folder / "adapter_config.json").is_file():
        return folder, None  # an adapter folder: prompts stay raw unless --format says otherwise
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "adapter", _run_config(folder)
    if (folder / "config.yaml").is_file():
        raise UserError(
            f"--adapter {folder} is a run folder without adapter/ (the run has not finished); "
            "export its latest checkpoint with scripts/export.py --run, or resume it"
        )
    raise UserError(
        f"--adapter {folder} holds no adapter_config.json; give an adapter folder or a run folder"
    )


def run_adapter_notes(path: str) -> list[str]:
    """What `--adapter RUN` loads, in lines for the console: the step `RUN/adapter/` holds and, when the
    run has a newer checkpoint (a resumed run that was stopped or crashed), that it is older and how to
    export the latest. Empty for an adapter folder.

    The step is the one the run recorded in the adapter's metadata (`jaxlora.step`, with where it came
    from and the run's state). An adapter without it was written right after the checkpoint of its last
    step: its step is the newest checkpoint written before it (the best step when `checkpoint.export` is
    best). A checkpoint written after the adapter is newer than it."""
    run = Path(path).expanduser()
    adapter = run / "adapter"
    if (run / "adapter_config.json").is_file() or not (adapter / "adapter_config.json").is_file():
        return []
    written = max(f.stat().st_mtime_ns for f in adapter.iterdir() if f.is_file())
    saved = _checkpoint_times(run / "checkpoints")
    newer = [s for s, t in saved.items() if t > written]
    lines = [f"adapter: {adapter} ({_adapter_step(run, written, saved, newer)})"]
    if newer:
        lines.append(
            f"note: {adapter} is older than the run's newest checkpoint (step {max(newer)}); export that "
            f"one with: python scripts/export.py --run {run} --format peft --out DIR"
        )
    return lines


def _adapter_step(run: Path, written: int, saved: dict[int, int], newer: list[int]) -> str:
    """Which step `run/adapter/` holds, in words: "step 300, the run's last step"."""
    recorded = _recorded(run / "adapter")
    if "step" in recorded:  # "step 261, from the checkpoint saved at the stop; run interrupted by ..."
        what = f"step {recorded['step']}"
        what += f", from the {recorded['from']}" if "from" in recorded else ""
        return what + (f"; run {recorded['state']}" if "state" in recorded else "")
    before = [s for s, t in saved.items() if t <= written]
    step = max(before) if before else None
    what = "its step is unknown: no older checkpoint is kept" if step is None else f"step {step}"
    cfg, state = _run_config(run) or {}, _run_state(run)
    best = _checkpoint_times(run / "best_checkpoint")
    best_step = max(best) if best and (cfg.get("checkpoint") or {}).get("export") == "best" else None
    if step is not None and best_step not in (None, step) and best[best_step] <= written:
        what = f"step {best_step}, the best step (the run was at step {step})"
    elif step is not None and not newer and state.get("finished") and state.get("step") == step:
        what += ", the run's last step"
    return what


def _recorded(adapter: Path) -> dict[str, str]:
    """What the run wrote into the adapter file's metadata (`jaxlora.step`, `.from`, `.state`), or {}."""
    try:
        with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError):
        return {}
    return {k.removeprefix("jaxlora."): v for k, v in meta.items() if k.startswith("jaxlora.")}


def _checkpoint_times(folder: Path) -> dict[int, int]:
    """{step: when its checkpoint was complete (ns)}: the mtime of the file list written last."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.iterdir():
        done = p / "jaxlora_files.json"
        if p.name.isdigit() and done.is_file():
            out[int(p.name)] = done.stat().st_mtime_ns
    return out


def _run_state(run: Path) -> dict:
    try:
        return json.loads((run / "run_state.json").read_text())
    except (OSError, ValueError):
        return {}


def chat_template_for(tokenizer, name: str | None) -> str:
    """The chat template for --format chat and --chat: `--chat-template` (a name, Jinja text or a .jinja
    file), else the run's `data.chat_template`, else the tokenizer's own; the errors name --chat-template."""
    try:
        return resolve_chat_template(tokenizer, name)
    except UserError as err:
        names = ", ".join(sorted(CHAT_TEMPLATES))
        if name is None:
            raise UserError(
                f"the tokenizer has no chat template; pass --chat-template ({names}, Jinja text or a "
                ".jinja file)"
            ) from None
        if "not found" in str(err):
            raise UserError(f"--chat-template: file not found: {name}") from None
        raise UserError(
            f"--chat-template {name!r} is not a known template; use {names}, Jinja text or a .jinja file"
        ) from None


def _run_config(run: Path | None) -> dict | None:
    return yaml.safe_load((run / "config.yaml").read_text()) if run is not None else None


def run_format(run_cfg: dict | None) -> tuple[str, str | None]:
    """The prompt format (alpaca, chat or raw) and chat template a run was trained with (raw without one)."""
    if not run_cfg:
        return "raw", None
    data = run_cfg.get("data") or {}
    fmt = ((data.get("train") or [{}])[0]).get("format", "raw")
    return (fmt if fmt in ("alpaca", "chat") else "raw"), data.get("chat_template")


def load_with_adapter(model: str, dtype="float32", adapter=None, quant="none", allow_pickle=False):
    """(the model, with the adapter's embedding rows and copies written in; the tokenizer, the adapter
    folder's when it has one (tokens added in training); the LoRA tree; its scale)."""
    quantizer = make_quantizer(quant)  # None for "none"; UserError for an unknown method
    m = load_model(model, dtype=dtype, allow_pickle=allow_pickle, quantizer=quantizer)
    tokenizer_dir, lora, scale = m.path, None, 1.0
    if adapter is not None:
        lora, lora_cfg = load_peft_adapter(adapter, m.config)
        scale = lora_scale(m.config, lora_cfg)
        params, lora = with_embeddings(m.params, lora)  # trainable tokens, copies, a grown vocabulary
        vocab = params["embed"]["embedding"].shape[0]
        m = dataclasses.replace(m, params=params, config=dataclasses.replace(m.config, vocab_size=vocab))
        if any((Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer_dir = Path(adapter)
    return m, load_tokenizer(tokenizer_dir), lora, scale


class Generator:
    """A loaded model (and adapter) that completes prompts given as token ids."""

    def __init__(self, model: str, dtype="float32", adapter=None, quant="none", allow_pickle=False):
        self.model, self.tokenizer, self.lora, self.scale = load_with_adapter(
            model, dtype, adapter, quant, allow_pickle
        )

    def complete(self, texts: list[str], max_new_tokens: int, **kw) -> list[str]:
        """The new text after each rendered prompt (special tokens dropped)."""
        ids = [encode_prompt(t, self.tokenizer) for t in texts]
        new = generate(
            self.model.params,
            self.model.config,
            ids,
            max_new_tokens,
            lora=self.lora,
            lora_scale=self.scale,
            **kw,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]


def run_generation(
    model: str,
    prompts: list[str],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    adapter: str | None = None,
    quant: str = "none",
    allow_pickle: bool = False,
    fmt: str | None = None,
    chat_template: str | None = None,
) -> list[str]:
    """Load a model (and optionally a PEFT adapter), generate for each prompt, return the text.

    quant: "none", "int8", "nf4" or "mxfp4" quantizes the base's linear weights while loading
    (`make_quantizer`).
    fmt: raw returns each prompt followed by its completion; alpaca or chat render each prompt as training
    did (`render_prompt`) and return the response alone. `adapter` may be a run folder; then fmt (when
    None) and chat_template (when None) follow the run's config.
    Sampling (temperature .. seed) is `jaxlora.models.generate.generate`'s.
    """
    fmt, chat_template, adapter = _settings(fmt, chat_template, adapter)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
              repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
    _check(max_new_tokens, **kw)
    if fmt != "raw":
        gen = Generator(model, dtype, adapter, quant, allow_pickle)
        if fmt == "chat":
            chat_template = chat_template_for(gen.tokenizer, chat_template)
        texts = [render_prompt(fmt, p, gen.tokenizer, chat_template) for p in prompts]
        return gen.complete(texts, max_new_tokens, **kw)
    m, tokenizer, lora, scale = load_with_adapter(model, dtype, adapter, quant, allow_pickle)
    return generate_text(m, tokenizer, prompts, max_new_tokens, lora=lora, lora_scale=scale, **kw)


def _settings(fmt, chat_template, adapter):
    """(format, chat template, adapter folder) with a run folder's defaults filled in."""
    run_cfg = None
    if adapter is not None:
        folder, run_cfg = resolve_adapter(adapter)
        adapter = str(folder)
    run_fmt, run_template = run_format(run_cfg)
    fmt = fmt or run_fmt
    if fmt not in PROMPT_FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(PROMPT_FORMATS)}")
    return fmt, chat_template or run_template, adapter


def _check(max_new_tokens, temperature=0.0, top_p=1.0, min_p=None, repetition_penalty=1.0, **_) -> None:
    """One line naming the flag for a value out of range (NaN included)."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise UserError(f"--min-p must be in [0, 1] (0 = off), got {min_p}")
    if not repetition_penalty > 0:
        raise UserError(f"--repetition-penalty must be > 0 (1 = off), got {repetition_penalty}")


def chat(
    model: str,
    lines,
    out=sys.stdout,
    max_new_tokens: int = 64,
    *,
    dtype: str = "float32",
    adapter: str | None = None,
    quant: str = "none",
    allow_pickle: bool = False,
    chat_template: str | None = None,
    prompt: str = "> ",
    **kw,
) -> list[tuple[str, str]]:
    """A conversation: each line read from `lines` (stdin) is a user turn, rendered with the earlier turns
    through the chat template; each answer is written to `out`. Ends at end of input or `/exit`.
    Returns the turns as (user, assistant) pairs."""
    _check(max_new_tokens, **kw)
    _, chat_template, adapter = _settings("chat", chat_template, adapter)
    gen = Generator(model, dtype, adapter, quant, allow_pickle)
    chat_template = chat_template_for(gen.tokenizer, chat_template)  # before the first turn is read
    history: list[tuple[str, str]] = []
    while True:
        out.write(prompt)
        out.flush()
        line = lines.readline()
        if not line or line.strip() == "/exit":
            out.write("\n")
            return history
        user = line.rstrip("\n")
        if not user.strip():
            continue
        text = render_prompt("chat", user, gen.tokenizer, chat_template, history)
        answer = gen.complete([text], max_new_tokens, **kw)[0].strip()
        out.write(answer + "\n")
        out.flush()
        history.append((user, answer))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="generate", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="HF hub id or local model folder")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="talk to the model: one user turn per line of stdin")
    p.add_argument(
        "--format",
        choices=PROMPT_FORMATS,
        default=None,
        help="render prompts as training did: alpaca, chat (the chat template) or raw; default: the run's "
        "format when --adapter is a run folder, else raw",
    )
    p.add_argument("--chat-template", default=None, help="chatml, llama3, Jinja text or a .jinja file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=None, help="keep tokens >= P x the best's; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder, or a training run's folder")
    p.add_argument(
        "--quant", default="none", choices=["none", "int8", "nf4", "mxfp4"], help="quantize the base weights"
    )
    p.add_argument("--allow-pickle", action="store_true", help="permit loading pytorch_model.bin")
    args = p.parse_args(argv)
    if bool(args.prompt) == args.chat:
        p.error("give --prompt (one or more) or --chat")
    return args


def main(argv=None) -> int:
    """`scripts/generate.py` and `jaxlora generate` (wrap with `cli_main`)."""
    args = parse_args(argv)
    for line in run_adapter_notes(args.adapter) if args.adapter else ():
        print(line, file=sys.stderr)  # stdout keeps the generated text alone
    common = dict(dtype=args.dtype, adapter=args.adapter, quant=args.quant, allow_pickle=args.allow_pickle)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip
    if args.chat:
        prompt = "> " if sys.stdin.isatty() else ""
        chat(args.model, sys.stdin, sys.stdout, args.max_new_tokens, chat_template=args.chat_template,
             prompt=prompt, **common, **sampling)  # fmt: skip
        return 0
    texts = run_generation(
        args.model, args.prompt, args.max_new_tokens, fmt=args.format, chat_template=args.chat_template,
        **common, **sampling,
    )  # fmt: skip
    for text in texts:
        print(text)
    return 0
