"""Run configuration: nested YAML -> frozen, typed pydantic sections, with dotted overrides and validation.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=3", "lora.target_modules=[q_proj,v_proj]"])
    save_config(cfg, run_dir / "config.yaml")   # load_config of that file gives an equal Config

Every section is a frozen pydantic model (`jaxlora.schema.Section`) that declares its keys' types, bounds
and meanings once, so a section built in code is validated exactly like one read from YAML. Lists are
stored as tuples and mappings as `FrozenDict`, so a `Config` is hashable. Every mistake raises `UserError`
with one line naming the dotted key. The `lora` and `data` sections belong to their layers
(`jaxlora.lora.config`, `jaxlora.data.config`). `docs/configuration.md` lists every key; `python -m
jaxlora.config` prints its tables.
"""

from jaxlora.config.reference import reference_markdown, reference_tables
from jaxlora.config.sections import (
    CheckpointSection,
    Config,
    DistributedSection,
    LoggingSection,
    MeshSection,
    ModelSection,
    ParallelSection,
    QuantSection,
    TrainSection,
)
from jaxlora.config.yaml_io import apply_overrides, config_from_dict, load_config, save_config
from jaxlora.data.config import DataConfig, DataSource, FrozenDict
from jaxlora.data.formats import FORMAT_FIELDS
from jaxlora.lora.config import LoraConfig

__all__ = [
    "FORMAT_FIELDS",
    "CheckpointSection",
    "Config",
    "DataConfig",
    "DataSource",
    "DistributedSection",
    "FrozenDict",
    "LoggingSection",
    "LoraConfig",
    "MeshSection",
    "ModelSection",
    "ParallelSection",
    "QuantSection",
    "TrainSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "reference_markdown",
    "reference_tables",
    "save_config",
]
