"""Sample generations at each evaluation: a few prompts decoded greedily with the current adapter.

The prompts are `train.sample_prompts` rendered in the first training source's format (`render_prompt`),
or else the first `train.eval_samples` validation examples cut where their first trained token starts,
so the model sees exactly the prompt text it was trained on. `jaxlora.models.generate` decodes them.
"""

import numpy as np

from jaxlora.data.templates import alpaca_prompt, resolve_chat_template
from jaxlora.data.tokenize import IGNORE, tokenizer_info
from jaxlora.errors import UserError
from jaxlora.models.generate import generate

PROMPT_FORMATS = ("alpaca", "chat", "raw")


def render_prompt(fmt: str, text: str, tokenizer=None, chat_template: str | None = None, history=()) -> str:
    """`text` as the prompt of a training format: alpaca (the Alpaca header, no input), chat (one user
    turn after `history` [(user, assistant), ...], through the chat template, with the generation prompt)
    or raw (unchanged; also prompt_completion and text sources)."""
    if fmt == "alpaca":
        return alpaca_prompt(text, None)
    if fmt == "chat":
        messages = []
        for user, answer in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": text})
        template = resolve_chat_template(tokenizer, chat_template)
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    if fmt in ("raw", "prompt_completion", "text"):
        return text
    raise UserError(f"unknown prompt format {fmt!r}; use one of {', '.join(PROMPT_FORMATS)}")


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt, with the BOS token where training adds one."""
    info = tokenizer_info(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if info.add_bos and (not ids or ids[0] != info.bos_id):
        ids = [info.bos_id, *ids]
    return ids


def sample_prompts(cfg, tokenizer, val) -> list[list[int]]:
    """The token ids of the prompts to sample at each evaluation (empty: none)."""
    n = cfg.train.eval_samples
    if n == 0:
        return []
    if cfg.train.sample_prompts:
        source = cfg.data.train[0]
        fmt = source.format
        texts = [render_prompt(fmt, p, tokenizer, cfg.data.chat_template) for p in cfg.train.sample_prompts]
        return [encode_prompt(t, tokenizer) for t in texts[:n]]
    if val is None or not hasattr(val, "__getitem__"):
        return []
    prompts = []
    for i in range(min(n, len(val))):
        ex = val[i]
        trained = np.flatnonzero(np.asarray(ex["labels"]) != IGNORE)
        cut = int(trained[0]) if len(trained) else len(ex["input_ids"])
        if cut > 0:
            prompts.append([int(t) for t in ex["input_ids"][:cut]])
    return prompts


def generate_samples(params, model_cfg, lora, scale, prompts, tokenizer, max_new_tokens: int) -> list[dict]:
    """Greedy completions: `[{"prompt": text, "completion": text}, ...]`."""
    if not prompts:
        return []
    new = generate(params, model_cfg, prompts, max_new_tokens, lora=lora, lora_scale=scale)
    return [
        {
            "prompt": tokenizer.decode(p, skip_special_tokens=True),
            "completion": tokenizer.decode(row, skip_special_tokens=True),
        }
        for p, row in zip(prompts, new, strict=True)
    ]
