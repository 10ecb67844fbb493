"""The sections of a run config and the top-level `Config` (the `lora` and `data` sections live in their
layers: `jaxlora.lora.config`, `jaxlora.data.config`)."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jaxlora.config.grpo import GrpoSection
from jaxlora.config.suggest import suggest_key
from jaxlora.data.config import DataConfig
from jaxlora.lora.config import LoraConfig
from jaxlora.schema import Bool, Float, Int, Invalid, NonBlank, Section, Str, listing

__all__ = [
    "CheckpointSection",
    "Config",
    "DistributedSection",
    "LoggingSection",
    "MeshSection",
    "ModelSection",
    "ParallelSection",
    "PrefsSection",
    "QuantSection",
    "TrainSection",
]

DType = Literal["float32", "bfloat16"]


class ModelSection(Section):
    """The base model to fine-tune."""

    _prefix = "model"

    path: NonBlank = Field(
        description="HF hub id (org/name) or local folder with config.json and safetensors"
    )
    revision: NonBlank | None = Field(
        None, description="hub branch, tag or commit; null = the default branch"
    )
    tokenizer: NonBlank | None = Field(
        None, description="hub id or folder of the tokenizer; null = model.path"
    )
    dtype: DType = Field("float32", description="storage dtype of the base parameters")
    compute_dtype: DType | None = Field(
        None, description="dtype of activations and matmuls; null = model.dtype"
    )
    attention: Literal["auto", "reference", "xla", "cudnn", "pallas"] = Field(
        "auto",
        description="attention kernel: auto = xla on CPU; on GPU cudnn where it can run (unpacked rows, "
        "one window, no soft-cap), else pallas (jaxlora's flash kernel: packing, per-layer windows, "
        "soft-capping), else the dense reference; or name one: reference, xla, cudnn, pallas",
    )
    allow_pickle: Bool = Field(
        False, description="permit loading pytorch_model.bin (pickle; runs code) if no safetensors"
    )
    random_init: Bool = Field(
        False,
        description="ignore any weights: random base from config.json, seeded by `seed` "
        "(smoke tests, benchmarks)",
    )


class QuantSection(Section):
    """Quantization of the frozen base weights."""

    _prefix = "quant"

    weights: Literal["none", "int8", "nf4", "mxfp4"] = Field(
        "none",
        description="quantize frozen base weights: none, int8, 4-bit NormalFloat or MXFP4 (keeps a "
        "checkpoint's MXFP4 tensors as shipped)",
    )
    block_size: Int | None = Field(
        None,
        ge=1,
        description="values per quantization scale; null = per output channel (int8), 64 (nf4), 32 (mxfp4, "
        "the only size)",
    )
    skip: listing(Str) = Field(("lm_head", "embed_tokens"), description="module names kept unquantized")

    @field_validator("skip")
    @classmethod
    def _no_empty_names(cls, skip: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s.strip() for s in skip):
            raise Invalid("{key} must not contain empty names, got {names}", names=list(skip))
        return skip


class PrefsSection(Section):
    """Preference tuning (`train.objective: dpo | orpo`); docs/preference-tuning.md."""

    _prefix = "prefs"

    beta: Float = Field(
        0.1, gt=0, description="DPO: how far the policy may move from the reference (higher = closer)"
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO loss: sigmoid (DPO), ipo (IPO, length-normalized) or hinge (SLiC)"
    )
    label_smoothing: Float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid loss only: assumed chance that a pair's labels are flipped"
    )
    orpo_alpha: Float = Field(
        0.1, gt=0, description="ORPO: weight of the odds-ratio term next to the NLL of the chosen response"
    )
    reference: Literal["base", "initial_adapter"] = Field(
        "base",
        description="DPO reference: base = the adapter off; initial_adapter = base + the lora.init_from "
        "adapter, frozen",
    )
    max_prompt_length: Int | None = Field(
        None, ge=1, description="keep only the last N tokens of each prompt; null = no limit"
    )


class TrainSection(Section):
    """Optimization: steps, batch, AdamW, schedule, memory."""

    _prefix = "train"

    objective: Literal["sft", "dpo", "orpo", "grpo"] = Field(
        "sft",
        description="sft = next-token loss on responses; dpo, orpo = preference pairs (prefs section); "
        "grpo = online RL on prompts with reward functions (grpo section)",
    )

    batch_size: Int = Field(8, ge=1, description="sequences per optimizer micro-step, across all devices")
    grad_accum_steps: Int = Field(1, ge=1, description="micro-steps accumulated per optimizer update")
    max_steps: Int | None = Field(
        200,
        ge=1,
        description="optimizer updates; null if num_epochs is given without it; "
        "with both, the first limit ends",
    )
    num_epochs: Float | None = Field(
        None, gt=0, description="passes over data.train; null = limited by max_steps only"
    )
    learning_rate: Float = Field(2.0e-4, gt=0, description="peak learning rate")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warmup, down to min_lr_ratio * learning_rate"
    )
    warmup_steps: Int = Field(10, ge=0, description="linear warmup steps (ignored when warmup_ratio is set)")
    warmup_ratio: Float | None = Field(
        None, ge=0, lt=1, description="warmup as a fraction of total steps, in [0, 1)"
    )
    min_lr_ratio: Float = Field(
        0.0, ge=0, le=1, description="final learning rate as a fraction of learning_rate, in [0, 1]"
    )
    weight_decay: Float = Field(0.0, ge=0, description="AdamW decoupled weight decay on LoRA parameters")
    adam_beta1: Float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: Float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_eps: Float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: Float | None = Field(
        1.0, gt=0, description="clip gradients to this global norm; null = no clipping"
    )
    loraplus_lr_ratio: Float | None = Field(
        None,
        gt=0,
        description="LoRA+: learning rate of B (and DoRA magnitudes) = this ratio x that of A, as PEFT's "
        "create_loraplus_optimizer; null = one learning rate",
    )
    remat: Literal["none", "fast", "dots", "lean", "full", "minimal", "offload"] = Field(
        "lean",
        description="what the backward pass keeps per layer (docs/performance.md#memory): none = every "
        "intermediate (most memory); fast = the large matmul outputs; dots = every matmul output; lean = "
        "the layer input, k, v and the attention output (about 2.5x the residual stream); full (or "
        "minimal) = the layer input only, the whole layer recomputed; offload = as full, with the inputs "
        "in pinned host memory (GPU only)",
    )
    loss_chunk_size: Int = Field(
        1024, ge=1, description="tokens per cross-entropy chunk (bounds the logits memory)"
    )
    moe_aux_loss: Bool = Field(
        False,
        description="mixture-of-experts: add the router's load-balancing loss times the model's "
        "router_aux_loss_coef, as HF does with output_router_logits (logged as train/aux_loss)",
    )
    preflight: Bool = Field(
        False,
        description="before loading any weights, compile the step from config.json alone (jaxlora plan) and "
        "refuse to start when its peak memory does not fit the device",
    )
    eval_every_steps: Int | None = Field(
        50, ge=1, description="evaluate every N optimizer steps; null = never"
    )
    eval_batches: Int | None = Field(
        None, ge=1, description="batches per evaluation; null = all validation data"
    )
    early_stopping_patience: Int | None = Field(
        None,
        ge=1,
        description="stop after this many evaluations in a row without progress (see "
        "early_stopping_min_delta); null = never",
    )
    early_stopping_min_delta: Float = Field(
        0.0,
        ge=0,
        description="early stopping's progress: an eval loss more than this below that of the last "
        "progress; the best checkpoint is the lowest eval loss whatever this is",
    )
    eval_samples: Int = Field(
        2,
        ge=0,
        description="prompts generated greedily at each evaluation (samples.jsonl, TensorBoard): "
        "train.sample_prompts, else the first N validation prompts; 0 = none",
    )
    sample_prompts: listing(Str) = Field(
        (),
        description="prompts for eval_samples, rendered in the first training source's format; "
        "empty = the first validation prompts",
    )
    sample_max_new_tokens: Int = Field(32, ge=1, description="new tokens per sample generation")

    @model_validator(mode="after")
    def _has_a_length(self) -> "TrainSection":
        if self.max_steps is None and self.num_epochs is None:
            raise Invalid("{max_steps} and {num_epochs} are both null; set one (e.g. {max_steps}=1000)")
        return self


class CheckpointSection(Section):
    """Saving and resuming training state."""

    _prefix = "checkpoint"

    every_steps: Int | None = Field(
        100, ge=1, description="save every N optimizer steps (and at the end); null = only at the end"
    )
    keep: Int = Field(2, ge=1, description="most recent checkpoints kept")
    resume: Literal["auto", "never", "always"] = Field(
        "auto",
        description="auto = resume from output_dir if it has a checkpoint; always = fail if none; never",
    )
    keep_best: Bool = Field(
        False, description="also keep the checkpoint with the lowest eval loss (output_dir/best_checkpoint)"
    )
    export: Literal["best", "last"] = Field(
        "last", description="adapter/ is written from the last step, or from the best checkpoint (keep_best)"
    )

    @model_validator(mode="after")
    def _best_is_kept(self) -> "CheckpointSection":
        if self.export == "best" and not self.keep_best:
            raise Invalid("{export} is best but {keep_best} is false; set checkpoint.keep_best=true")
        return self


class LoggingSection(Section):
    """Metrics output."""

    _prefix = "logging"

    every_steps: Int = Field(10, ge=1, description="log training metrics every N optimizer steps")
    tensorboard: Bool = Field(True, description="write TensorBoard event files to output_dir")
    progress_bar: Bool = Field(True, description="show a progress bar on the terminal")
    level: Literal["info", "warning"] = Field(
        "info", description="console: info = start and end summaries and eval lines; warning = only problems"
    )
    trackers: listing(Literal["tensorboard", "jsonl", "wandb"]) = Field(
        ("tensorboard", "jsonl"),
        description="where metrics go; wandb needs the `wandb` extra (offline with WANDB_MODE=offline); "
        "logging.tensorboard=false also drops tensorboard",
    )


class MeshSection(Section):
    """Device mesh axis sizes for parallel.strategy mesh."""

    _prefix = "parallel.mesh"

    data: Int = Field(-1, description="data-parallel axis size; -1 = all devices left over")
    fsdp: Int = Field(1, ge=1, description="axis that shards parameters and optimizer state")
    tensor: Int = Field(1, ge=1, description="tensor-parallel axis size")
    expert: Int = Field(
        1, ge=1, description="expert-parallel axis size: splits a mixture-of-experts model's experts"
    )

    @field_validator("data")
    @classmethod
    def _all_or_some(cls, data: int) -> int:
        if data != -1 and data < 1:
            raise Invalid("{key} must be -1 (all remaining devices) or >= 1, got {data}", data=data)
        return data


class DistributedSection(Section):
    """Multi-host setup (jax.distributed.initialize)."""

    _prefix = "parallel.distributed"

    enabled: Bool | None = Field(
        None, description="initialize multi-host JAX; null = auto-detect from the environment"
    )
    coordinator_address: Str | None = Field(None, description="host:port of process 0; null = auto-detect")
    num_processes: Int | None = Field(None, ge=1, description="number of processes; null = auto-detect")
    process_id: Int | None = Field(None, ge=0, description="this process's index; null = auto-detect")

    @model_validator(mode="after")
    def _consistent(self) -> "DistributedSection":
        if None not in (self.num_processes, self.process_id) and self.process_id >= self.num_processes:
            raise Invalid(
                "{process_id} must be < num_processes ({n}), got {got}",
                n=self.num_processes,
                got=self.process_id,
            )
        if self.enabled is False and self.coordinator_address is not None:
            raise Invalid("{coordinator_address} is set but {enabled} is false")
        return self


class ParallelSection(Section):
    """How devices are used."""

    _prefix = "parallel"

    strategy: Literal["auto", "single", "pmap", "mesh"] = Field(
        "auto",
        description="auto (single device or data-parallel mesh), single, pmap, or mesh (uses parallel.mesh)",
    )
    mesh: MeshSection = Field(default_factory=MeshSection, description="mesh axis sizes")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="multi-host setup"
    )

    @model_validator(mode="after")
    def _mesh_fits_the_strategy(self) -> "ParallelSection":
        if self.strategy in ("single", "pmap"):
            for name in ("fsdp", "tensor", "expert"):
                if getattr(self.mesh, name) != 1:
                    raise Invalid(
                        "{key}={size} needs {strategy} mesh or auto, not {chosen}",
                        at=f"mesh.{name}", size=getattr(self.mesh, name), chosen=self.strategy,
                    )  # fmt: skip
        return self


class Config(Section):
    """A whole run. Build with `load_config` or `config_from_dict`; save with `save_config`."""

    output_dir: NonBlank = Field(
        description="run folder: checkpoints, adapters, logs and the resolved config.yaml"
    )
    seed: Int = Field(
        0, ge=0, lt=2**32, description="seed for parameter init, dropout, shuffling and the validation split"
    )
    overwrite: Bool = Field(
        False,
        description="start afresh in an output_dir that holds another run or other files (its run files "
        "are removed once setup succeeds); false = resume a compatible run, else refuse",
    )
    model: ModelSection = Field(description="base model")
    quant: QuantSection = Field(default_factory=QuantSection, description="base weight quantization")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapters")
    data: DataConfig = Field(description="datasets")
    train: TrainSection = Field(default_factory=TrainSection, description="optimization")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="checkpoints")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="metrics")
    parallel: ParallelSection = Field(default_factory=ParallelSection, description="devices")
    prefs: PrefsSection = Field(default_factory=PrefsSection, description="preference tuning (DPO, ORPO)")
    grpo: GrpoSection = Field(default_factory=GrpoSection, description="online RL (GRPO) and its rewards")

    @model_validator(mode="after")
    def _has_validation_data(self) -> "Config":
        if (
            self.train.eval_every_steps is not None
            and not self.data.validation
            and not self.data.validation_split
        ):
            raise Invalid(
                "train.eval_every_steps is set but there is no validation data (data.validation is empty and "
                "data.validation_split is 0); set train.eval_every_steps=null or give validation data"
            )
        return self

    @model_validator(mode="after")
    def _grpo_fits_the_batch(self) -> "Config":
        if self.train.objective == "grpo":
            self.grpo.check_run(self.train.batch_size, self.train.grad_accum_steps)
        return self

    @model_validator(mode="after")
    def _reference_exists(self) -> "Config":
        if self.prefs.reference == "initial_adapter" and self.lora.init_from is None:
            raise Invalid(
                "prefs.reference is initial_adapter but there is no initial adapter (lora.init_from); "
                "use prefs.reference=base"
            )
        return self

    @classmethod
    def suggest(cls, where: str, name: str, section: type[Section]) -> str | None:
        return suggest_key(cls, where, name, section)
