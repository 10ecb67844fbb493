"""'Did you mean' for unknown keys: names from HF Trainer, PEFT and Axolotl, close spellings, and the
right name in the wrong section."""

import difflib
import functools

from jaxlora.schema import Section, join, section_type

__all__ = ["ALIASES", "all_keys", "suggest_key"]

# Names from HF Trainer, PEFT and Axolotl configs, mapped to ours (used for suggestions only).
ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_target_linear": "lora.target_modules",
    "lr": "train.learning_rate",
    "micro_batch_size": "train.batch_size",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "num_train_epochs": "train.num_epochs",
    "epochs": "train.num_epochs",
    "lr_scheduler": "train.lr_schedule",
    "lr_scheduler_type": "train.lr_schedule",
    "gradient_checkpointing": "train.remat",
    "eval_steps": "train.eval_every_steps",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep",
    "resume_from_checkpoint": "checkpoint.resume",
    "logging_steps": "logging.every_steps",
    "sequence_len": "data.seq_len",
    "max_seq_length": "data.seq_len",
    "max_seq_len": "data.seq_len",
    "seq_length": "data.seq_len",
    "max_length": "data.seq_len",
    "sample_packing": "data.packing",
    "datasets": "data.train",
    "dataset": "data.train",
    "test_datasets": "data.validation",
    "val_set_size": "data.validation_split",
    "dataset_prepared_path": "data.cache_dir",
    "dataset_processes": "data.num_proc",
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "torch_dtype": "model.dtype",
    "bf16": "model.dtype",
    "load_in_8bit": "quant.weights",
    "load_in_4bit": "quant.weights",
    "output": "output_dir",
}


@functools.cache
def all_keys(root: type[Section], where: str = "") -> tuple[str, ...]:
    """Every dotted key of the schema (sections and leaves), not descending into list items."""
    keys: list[str] = []
    for name, info in root.model_fields.items():
        key = join(where, name)
        keys.append(key)
        section = section_type(info.annotation)
        if section is not None:
            keys.extend(all_keys(section, key))
    return tuple(keys)


def suggest_key(root: type[Section], where: str, name: str, section: type[Section]) -> str | None:
    """The most likely intended key for unknown `name` in `section` (at dotted path `where` of `root`)."""
    lowered = name.lower()
    if lowered in section._aliases:
        return join(where, section._aliases[lowered])
    if lowered in ALIASES:
        return ALIASES[lowered]
    close = difflib.get_close_matches(lowered, list(section.model_fields), n=1, cutoff=0.6)
    if close:
        return join(where, close[0])
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(all_keys(root))}  # first key per leaf name
    if lowered in leaves:
        return leaves[lowered]  # right name, wrong section
    close = difflib.get_close_matches(lowered, list(leaves), n=1, cutoff=0.8)
    return leaves[close[0]] if close else None
