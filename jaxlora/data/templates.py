"""Prompt templates: the Alpaca prompts and the named chat templates (`chatml`, `llama3`).

Chat templates are Jinja strings rendered through `tokenizer.apply_chat_template`, the same path as a
tokenizer's own template, so a named template and a tokenizer template behave alike.
"""

from pathlib import Path

from jaxlora.errors import UserError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# With `tools` (function schemas), both named templates open with a system turn listing them as JSON.
CHATML = (
    "{%- if tools -%}{{ '<|im_start|>system\\nYou can call these functions:\\n' + (tools | tojson) + "
    "'<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Llama 3 instruct layout; `bos_token` rather than a literal so it follows the tokenizer in use.
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- if tools -%}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nYou can call these functions:\\n' + "
    "(tools | tojson) + '<|eot_id|>' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}


ALPACA_PREAMBLE_END = "### Instruction:"


def alpaca_prompt(
    instruction: str, input_text: str | None, *, system: str | None = None, first: bool = True
) -> str:
    """The standard Alpaca prompt, with the `### Input:` block only when `input_text` is non-blank.

    `system` (non-blank) replaces the standard preamble; `first=False` (a later turn of a row with
    `history`) leaves the preamble out."""
    if input_text and input_text.strip():
        prompt = ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    else:
        prompt = ALPACA_NO_INPUT.format(instruction=instruction)
    body = prompt[prompt.index(ALPACA_PREAMBLE_END) :]
    if not first:
        return body
    if system and system.strip():
        return system.strip() + "\n\n" + body
    return prompt


def resolve_chat_template(tokenizer, name: str | None) -> str:
    """The Jinja chat template to use: a named one (`chatml`, `llama3`), Jinja text, a `.jinja` file,
    or the tokenizer's own (`None`)."""
    if name is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise UserError(
                "the tokenizer has no chat template; set data.chat_template to one of: "
                + ", ".join(sorted(CHAT_TEMPLATES))
            )
        return own
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    if "{{" in name or "{%" in name:
        return name
    path = Path(name).expanduser()
    if path.suffix == ".jinja":
        if not path.is_file():
            raise UserError(f"chat template file not found: {name}")
        return path.read_text()
    raise UserError(
        f"unknown data.chat_template '{name}'; valid: {', '.join(sorted(CHAT_TEMPLATES))}, "
        "Jinja text, a .jinja file, or null for the tokenizer's own template"
    )
