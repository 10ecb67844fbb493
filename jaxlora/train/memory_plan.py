"""`plan_memory(cfg)`: what a run holds on each device, from the model's `config.json` alone.

No weight, tokenizer or data file is read. The run's arrays are built as shapes (`jax.ShapeDtypeStruct`):

    base = abstract_base(cfg, model)            params tree [L, in, out] kernels... (QuantizedTensor with
                                                quant.weights), as `load_base` would hold it
    state = abstract_state(cfg, model)          the Adapter (trainable: a [L, in, r], b [L, r, out]...),
                                                AdamW's state of its trainable half, DPO's reference
    compiled = compile_step(cfg, state, plan)   the run's one train step (its objective, its plan's
                                                shardings), lowered from those shapes and a batch of
                                                [grad_accum, batch_size, seq_len] arrays; GRPO's rollout
                                                too (`jaxlora.train.plan_programs`)

and XLA's `memory_analysis()` of the compiled step gives the bytes per device:

    peak = arguments + temp + outputs - aliased

arguments: base weights, adapter, optimizer state, batch; temp: what the step allocates (activations
kept for the backward pass, gradients, logits chunks, workspace; `memory.activations`); outputs: the new
adapter, optimizer state and metrics; aliased: outputs written in place of donated arguments (the adapter
and optimizer state), counted once. On the CPU these are XLA:CPU's figures: a GPU compiles another program
(its fusions, attention kernels), so plan on the device kind that will run. Counts: `params.total` as
transformers' `num_parameters()` (tied weights once), `params.trainable` as PEFT's
`get_nb_trainable_parameters()` (`jaxlora.lora.peft_count`).
"""

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxlora.config import Config
from jaxlora.errors import UserError
from jaxlora.lora import Adapter, init_lora
from jaxlora.lora.peft_count import peft_trainable_count
from jaxlora.models.config import DecoderConfig, ModelSource, read_source
from jaxlora.models.loading import resolve_model_path
from jaxlora.models.random_weights import init_params
from jaxlora.models.spec import name_table, quantized, stack_rows
from jaxlora.parallel import Plan
from jaxlora.quant import QuantizedTensor, count_params, make_quantizer
from jaxlora.quant.abstract import abstract_quantize
from jaxlora.quant.tensor import human_bytes
from jaxlora.train.optim import make_optimizer
from jaxlora.train.plan_programs import (
    abstract_batch,
    compile_rollout,
    compile_step,
    grpo_lengths,
    run_seq_len,
    step_memory,
)
from jaxlora.train.setup import choose_plan

GIB = 1 << 30
PEAK_FORMULA = "arguments + temp + outputs - aliased"
OFFLOAD_NOTE = (
    "train.remat=offload needs a GPU: planned as minimal less the layer inputs offload keeps in pinned host "
    "memory ({gib:.2f} GiB); a GPU plans it exactly"
)
ROLLOUT_NOTE = (
    "grpo: the step's rows are the prompt ({p} tokens, left-padded) and the completion ({c}); the rollout "
    "(memory.rollout) runs before it, so the peak is the larger of the two"
)
CPU_NOTE = (
    "the figures are XLA:CPU's: a GPU compiles another program (its fusions and attention kernels), so "
    "plan on the kind of device that will run"
)


@dataclasses.dataclass(frozen=True)
class State:
    """The run's step arguments as shapes, and the optimizer they were built for."""

    model: DecoderConfig  # with the run's Runtime (compute dtype, attention, remat)
    base: dict  # ShapeDtypeStruct leaves; QuantizedTensor kernels with quant.weights
    adapter: Adapter  # float32; trainable {group: {module: {"a": [L, in, r], "b": [L, r, out]}}}, ...
    opt_state: Any  # optimizer.init(adapter.trainable)
    extra: tuple  # (DPO's frozen reference adapter,) or ()
    optimizer: optax.GradientTransformation
    trainable: int  # PEFT's count


def config_source(cfg: Config) -> ModelSource:
    """`model.path`'s config.json, read once: a local folder as it is (only config.json needs to be
    there), a hub id by downloading config.json alone."""
    path = cfg.model.path
    if Path(path).expanduser().is_dir() or path.startswith((".", "/", "~")):
        return read_source(resolve_model_path(path), path)
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(path, "config.json", revision=cfg.model.revision)
    except Exception as err:  # offline, unknown repo, gated, ...
        raise UserError(
            f"could not download config.json of {path!r} from the Hugging Face hub ({type(err).__name__}); "
            "check the id and your connection, or pass a local folder"
        ) from None
    return read_source(Path(file).parent, path)


def run_model(cfg: Config, source: ModelSource) -> DecoderConfig:
    """The model config with the run's Runtime, as `load_base` sets it (`offload` off a GPU: `minimal`,
    which `Planner` corrects by the inputs offload would move to the host)."""
    m, remat = cfg.model, cfg.train.remat
    if remat == "offload" and jax.default_backend() != "gpu":
        remat = "minimal"
    return source.config.with_runtime(
        compute_dtype=m.compute_dtype or m.dtype, attention=m.attention, remat=remat
    )


def offloaded_bytes(model: DecoderConfig, plan: Plan, batch: int, seq_len: int) -> int:
    """Per device: the layer inputs `train.remat=offload` moves to host memory, [L, B, T, D] of one
    micro-batch in the compute dtype."""
    x = abstract_batch(plan, ("x",), 1, batch, seq_len)["x"]
    rows = x.shape[-2] if plan.strategy == "pmap" else x.sharding.shard_shape(x.shape)[1]
    itemsize = np.dtype(model.runtime.compute_dtype).itemsize
    return model.num_layers * rows * seq_len * model.hidden_size * itemsize


def abstract_base(cfg: Config, model: DecoderConfig) -> dict:
    """The frozen base weights as the loader holds them (model.dtype; the linear kernels quantized as
    `quant` says), as abstract arrays."""
    params = jax.eval_shape(lambda: init_params(model, 0, cfg.model.dtype))
    q = cfg.quant
    quantizer = None if q.weights == "none" else make_quantizer(q.weights, q.block_size, tuple(q.skip))
    if quantizer is None:
        return params
    for entry in name_table(model):
        if quantized(entry) and quantizer.wants(entry.hf):
            *lead, n_in, n_out = entry.shape(model)
            lead = ((stack_rows(entry, model),) if entry.per_layer else ()) + tuple(lead)
            entry.put(params, abstract_quantize(lead, (n_in, n_out), q.weights, q.block_size, entry.hf))
    return params


def abstract_state(cfg: Config, model: DecoderConfig) -> State:
    """The base, the fresh adapter, the optimizer state and DPO's reference, as abstract arrays. PiSSA and
    OLoRA adapters have the shapes of a default one (their SVD runs on the host); token texts in
    `lora.trainable_token_indices` stand for as many rows (their ids need the tokenizer)."""
    base = abstract_base(cfg, model)
    lora_cfg = cfg.lora
    if lora_cfg.init not in ("default", "gaussian"):
        lora_cfg = lora_cfg.model_copy(update={"init": "default"})
    if lora_cfg.trainable_token_indices:
        lora_cfg = lora_cfg.model_copy(
            update={"trainable_token_indices": tuple(range(len(lora_cfg.trainable_token_indices)))}
        )
    key = jax.random.key(cfg.seed)
    tree = jax.eval_shape(lambda p: init_lora(model, lora_cfg, key, params=p), base)
    adapter = Adapter.split(tree)
    optimizer, _ = make_optimizer(cfg.train, cfg.train.max_steps or 1000)
    opt_state = jax.eval_shape(optimizer.init, adapter.trainable)
    wants_reference = cfg.train.objective == "dpo" and cfg.prefs.reference == "initial_adapter"
    extra = (tree,) if wants_reference else ()
    trainable = peft_trainable_count(model, lora_cfg, tree)
    return State(model, base, adapter, opt_state, extra, optimizer, trainable)


def device_bytes(tree, shardings=None) -> int:
    """Bytes one device holds of `tree`'s arrays: each leaf's shard under its sharding (`shardings`, a
    tree like `tree`, or the arrays' own); leaves without one count whole."""
    leaves = jax.tree.leaves(tree)
    specs = (
        jax.tree.leaves(shardings)
        if shardings is not None
        else [getattr(x, "sharding", None) for x in leaves]
    )
    total = 0
    for x, s in zip(leaves, specs, strict=True):
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def weights_by_kind(base: dict, shardings) -> dict[str, int]:
    """Bytes per device of the base, by storage: "int8" / "nf4" / "mxfp4" (quantized kernels with their
    scales) or the dtype of the rest."""
    is_q = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    kinds: dict[str, int] = {}
    leaves = jax.tree.leaves(base, is_leaf=is_q)
    for x, s in zip(leaves, jax.tree.leaves(shardings, is_leaf=is_q), strict=True):
        kind = x.method if is_q(x) else np.dtype(x.dtype).name
        kinds[kind] = kinds.get(kind, 0) + device_bytes(x, s)
    return kinds


def device_capacity(memory_gib: float | None = None) -> tuple[int, str]:
    """(bytes, where from): `memory_gib` GiB, else the first local device's memory limit, else (the CPU)
    the host's physical memory."""
    if memory_gib is not None:
        return int(memory_gib * GIB), "--memory-gib"
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.platform} device memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


@dataclasses.dataclass
class Planner:
    """One config's plan: the model, the devices and the abstract state, built once; `report(seq_len)`
    compiles the step at that length."""

    cfg: Config
    memory_gib: float | None = None
    source: ModelSource | None = None  # the run's, when it has read config.json already
    plan: Plan | None = None  # the run's, when it has chosen one already

    def __post_init__(self):
        self.source = self.source or config_source(self.cfg)
        self.plan = self.plan or choose_plan(self.cfg, self.source)
        self.state = abstract_state(self.cfg, run_model(self.cfg, self.source))
        self.capacity, self.capacity_from = device_capacity(self.memory_gib)
        self.compiled: dict[int, tuple[dict, float]] = {}  # seq_len -> (step_memory, seconds)
        self.rollout: dict | None = None  # GRPO: the rollout's step_memory, compiled once
        self.rollout_s = 0.0

    def report(self, seq_len: int, compile_step_too: bool = True) -> dict:
        """The plan at `seq_len` (a dict: see `plan_memory`); a length is compiled once."""
        out = self._static(seq_len)
        mem = out["memory"]
        if compile_step_too:
            if seq_len not in self.compiled:
                t0 = time.perf_counter()
                figures = step_memory(compile_step(self.cfg, self.state, self.plan, seq_len))
                self.compiled[seq_len] = figures, round(time.perf_counter() - t0, 2)
            figures, out["compile_s"] = self.compiled[seq_len]
            mem.update(figures)
            if self.cfg.train.remat != self.state.model.runtime.remat:  # offload, estimated off a GPU
                moved = offloaded_bytes(self.state.model, self.plan, self.cfg.train.batch_size, seq_len)
                mem["activations"] -= moved
                mem["peak"] -= moved
                out["notes"].append(OFFLOAD_NOTE.format(gib=moved / GIB))
            if self.cfg.train.objective == "grpo":
                self._add_rollout(out)
            out["fits"] = mem["peak"] <= mem["capacity"]
            if mem["backend"] == "cpu":
                out["notes"].insert(0, CPU_NOTE)
        else:  # the arguments alone: a lower bound; fits is None (unknown) unless they do not fit
            mem["peak"] = mem["weights"] + mem["trainable"] + mem["adapter_frozen"] + mem["optimizer"]
            out["fits"] = False if mem["peak"] > mem["capacity"] else None
        return out

    def _add_rollout(self, out: dict) -> None:
        """GRPO: the rollout's figures under memory["rollout"]; the peak is the larger of the step's and
        the rollout's plus the optimizer state (which stays on the device while the rollout runs)."""
        if self.rollout is None:
            t0 = time.perf_counter()
            self.rollout = step_memory(compile_rollout(self.cfg, self.state, self.plan))
            self.rollout_s = round(time.perf_counter() - t0, 2)
        mem = out["memory"]
        mem["rollout"] = dict(self.rollout, peak_with_optimizer=self.rollout["peak"] + mem["optimizer"])
        mem["peak"] = max(mem["peak"], mem["rollout"]["peak_with_optimizer"])
        out["compile_s"] += self.rollout_s
        out["notes"].append(ROLLOUT_NOTE.format(p=out["run"]["prompt_len"], c=out["run"]["completion_len"]))

    def _static(self, seq_len: int) -> dict:
        """What the shapes say without compiling: counts and the per-device bytes of the arguments."""
        cfg, plan, s = self.cfg, self.plan, self.state
        base_s, lora_s = plan.param_shardings(s.base), plan.lora_shardings(s.adapter)
        opt_s = plan.like_shardings(s.opt_state, s.adapter.trainable, lora_s.trainable)
        frozen = device_bytes(s.adapter.frozen, lora_s.frozen)
        frozen += sum(device_bytes(x, plan.lora_shardings(x)) for x in s.extra)
        dev = jax.local_devices()[0]
        memory = {
            "weights": device_bytes(s.base, base_s),
            "weights_by_kind": weights_by_kind(s.base, base_s),
            "trainable": device_bytes(s.adapter.trainable, lora_s.trainable),
            "adapter_frozen": frozen,
            "optimizer": device_bytes(s.opt_state, opt_s),
            "arguments": None, "outputs": None, "aliased": None, "activations": None, "peak": None,
            "peak_formula": PEAK_FORMULA,
            "capacity": self.capacity,
            "capacity_from": self.capacity_from,
            "backend": jax.default_backend(),
            "device_kind": dev.device_kind,
        }  # fmt: skip
        t = cfg.train
        return {
            "model": {"path": cfg.model.path, "model_type": s.model.model_type, "layers": s.model.num_layers,
                      "dtype": cfg.model.dtype, "quant": cfg.quant.weights},
            "run": {"objective": t.objective, "seq_len": seq_len, "batch_size": t.batch_size,
                    "grad_accum_steps": t.grad_accum_steps, "remat": t.remat, "lora_r": cfg.lora.r,
                    "parallel": plan.describe(), "devices": plan.mesh.size, **_grpo_run(cfg)},
            "params": {"total": count_params(s.base), "trainable": s.trainable},
            "memory": memory,
            "compile_s": None,
            "fits": None,
            "notes": _notes(cfg),
        }  # fmt: skip


def _grpo_run(cfg: Config) -> dict:
    """GRPO's lengths and group size for the plan's "run" entry (nothing for other objectives)."""
    if cfg.train.objective != "grpo":
        return {}
    prompt, completion = grpo_lengths(cfg)
    return {"prompt_len": prompt, "completion_len": completion, "num_generations": cfg.grpo.num_generations}


def _notes(cfg: Config) -> list[str]:
    if cfg.data.add_special_tokens:
        return ["data.add_special_tokens grows the vocabulary by the tokenizer's new rows: not counted"]
    return []


def plan_memory(cfg: Config, *, compile_step_too: bool = True, memory_gib: float | None = None) -> dict:
    """The memory plan of the run `cfg` describes, from `model.path`'s config.json alone.

    Returns {"model": {...}, "run": {...}, "params": {"total", "trainable"}, "memory": {"weights",
    "weights_by_kind", "trainable", "adapter_frozen", "optimizer", "arguments", "outputs", "aliased",
    "activations", "peak", "peak_formula", "capacity", "capacity_from", "backend", "device_kind"},
    "compile_s", "fits", "notes"}: bytes per device, `peak` = arguments + temp + outputs - aliased of
    the compiled step (`activations` = XLA's temp). With `compile_step_too=False` nothing is compiled:
    activations, outputs and compile_s are None, `peak` is the arguments alone (a lower bound) and `fits`
    is None unless they alone do not fit. `fits`: peak <= `memory_gib` GiB, by default the local device's
    memory (the host's on the CPU). On the CPU, `notes` says that the figures are XLA:CPU's."""
    return Planner(cfg, memory_gib).report(run_seq_len(cfg), compile_step_too)


def longest_seq_len(cfg: Config, *, memory_gib: float | None = None, planner: Planner | None = None) -> dict:
    """The plan at the longest `data.seq_len` that fits (`plan_memory`'s dict with "max_seq_len"; 0 and
    the plan at 1 when none does): doubling from `data.seq_len` (halving while it does not fit), then
    bisecting to within 1/16 (multiples of 8 above 64), up to the model's max_position_embeddings.
    `planner`: one already built for `cfg` (its compiled lengths are reused), else a new one."""
    if cfg.train.objective == "grpo":
        raise UserError(
            "--max-seq-len searches data.seq_len; a grpo run's rows are grpo.max_prompt_length + "
            "grpo.max_completion_length: plan those lengths instead"
        )
    p = planner or Planner(cfg, memory_gib)
    fits = lambda n: p.report(n)["fits"]  # noqa: E731
    limit = p.state.model.max_position_embeddings
    lo = min(cfg.data.seq_len, limit)
    while not fits(lo):
        if lo == 1:
            return {**p.report(1), "max_seq_len": 0}
        lo //= 2
    hi = lo
    while hi < limit and fits(hi):
        lo, hi = hi, min(2 * hi, limit)
    if fits(hi):
        return {**p.report(hi), "max_seq_len": hi}
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        mid = mid - mid % 8 if mid > 64 and mid - mid % 8 > lo else mid
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {**p.report(lo), "max_seq_len": lo}


def preflight(cfg: Config, source: ModelSource, plan: Plan) -> dict:
    """`train.preflight`: the plan of the run (its config.json and `Plan`), or a one-line UserError when
    its peak does not fit the device."""
    report = Planner(cfg, None, source, plan).report(run_seq_len(cfg))
    if not report["fits"]:
        m = report["memory"]
        raise UserError(
            f"train.preflight: the plan's peak is {m['peak'] / GIB:.2f} GiB per device, more than the "
            f"{m['capacity'] / GIB:.2f} GiB of {m['capacity_from']}; lower data.seq_len or "
            "train.batch_size, or set train.remat=full (jaxlora plan shows the figures)"
        )
    return report


def run_step_memory(cfg: Config, steps, state) -> dict | None:
    """`step_memory` of a run's own train step (`jaxlora.train.loop.Steps` and its `TrainState`), compiled
    here from its arrays and the batch's shape; the first step reuses this compilation. None under pmap
    (its step is compiled on the first call)."""
    if steps.plan.strategy == "pmap":
        return None
    t = cfg.train
    batch = abstract_batch(steps.plan, steps.keys, t.grad_accum_steps, t.batch_size, cfg.data.seq_len)
    args = (state.adapter, state.opt_state, steps.base.params, batch, steps.key, steps.scale, *steps.extra)
    compiled = steps.train_fn.lower(*args).compile()
    return None if compiled.memory_analysis() is None else step_memory(compiled)


def peak_line(memory: dict) -> str:
    """The start summary's line: the compiled step's peak per device and its parts."""
    cpu = " (XLA:CPU's figures)" if jax.default_backend() == "cpu" else ""
    b = {k: human_bytes(v) for k, v in memory.items()}
    return (
        f"memory plan: peak {b['peak']} per device = arguments {b['arguments']} + activations "
        f"{b['activations']} + outputs {b['outputs']} - aliased {b['aliased']}{cpu}"
    )
