"""The baseline: train a `BenchSpec` with transformers + PEFT in this process (sdpa attention, AdamW,
gradient clipping at 1.0), and return the same measurements as the jaxlora worker.

Imported only in the PEFT worker process (`benchmarks.harness.run_worker`), after the CPU affinity is set.
"""

import tempfile
import time

import peft
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.spec import PEFT_CHECKPOINTING, BenchSpec, model_folder, random_ids
from benchmarks.timing import host_peak_rss, summary, timed_windows
from jaxlora.errors import UserError


def matmul_peak(dtype: str) -> float:
    """Best FLOP/s of a large square matmul in PyTorch on the benchmark device."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, reps, trials = (8192, 20, 3) if dev == "cuda" else (2048, 2, 2)
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=dev)
    a @ a
    best = float("inf")
    for _ in range(trials):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ a
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def _quantized_model(spec: BenchSpec, folder: str, dtype):
    """The base quantized by bitsandbytes (int8, or nf4 with double quantization) on the GPU."""
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover - depends on the install
        raise UserError("the PEFT int8/nf4 baseline needs bitsandbytes: pip install bitsandbytes") from err
    if spec.quant == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantizes while loading a checkpoint
        with torch.device("cuda"):
            dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
        dense.save_pretrained(tmp)
        del dense
        torch.cuda.empty_cache()
        return AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=qcfg, dtype=dtype, attn_implementation="sdpa", device_map={"": 0}
        )


def _model(spec: BenchSpec, folder: str, random: bool, device: str):
    dtype = getattr(torch, spec.dtype)
    if spec.quant != "none":
        if device != "cuda":
            raise UserError("the PEFT baseline quantizes with bitsandbytes, which needs a CUDA GPU")
        return _quantized_model(spec, folder, dtype)
    if random:
        torch.manual_seed(spec.seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(folder), dtype=dtype, attn_implementation="sdpa"
            )
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)


def run(spec: BenchSpec) -> dict:
    """Train `spec` with transformers + PEFT in this process; returns the worker's measurements."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.threads and device == "cpu":
        torch.set_num_threads(spec.threads)
    folder, random = model_folder(spec)
    t0 = time.perf_counter()
    model = _model(spec, str(folder), random, device)
    checkpointing = spec.remat in PEFT_CHECKPOINTING
    if spec.quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora_cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora_cfg)
    model.train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    host_ids = random_ids(spec, model.config.vocab_size)
    batches = [torch.from_numpy(b[0]).long().to(device) for b in host_ids]
    state = {"i": 0, "loss": None}

    def one_step():
        ids = batches[state["i"] % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss  # labels are shifted inside, as jaxlora's targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss.detach()
        if spec.sync_every_step:
            float(state["loss"])
        state["i"] += 1

    def run_window(n):
        for _ in range(n):
            one_step()
        sync()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_window(1)
    first_step_s = time.perf_counter() - t0
    loss_first = float(state["loss"])
    run_window(max(spec.warmup - 1, 0))
    walls, cpus = timed_windows(run_window, spec)
    if device == "cuda":
        mem, kind = int(torch.cuda.max_memory_allocated()), "device"
        name = f"gpu:{torch.cuda.get_device_name()}"
    else:
        mem, kind, name = host_peak_rss(), "host_rss", "cpu"
    return {
        "framework": "peft",
        "device": name,
        "load_s": load_s,
        "compile_s": 0.0,  # eager PyTorch: nothing is compiled ahead of the first step
        "first_step_s": first_step_s,
        "loss_first": loss_first,
        "loss_last": float(state["loss"]),
        "peak_memory_bytes": mem,
        "memory_kind": kind,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "versions": {"torch": torch.__version__, "peft": peft.__version__},
        **summary(walls, cpus, spec),
    }
