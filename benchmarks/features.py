"""`--features`: the preset's defaults, then one speed switch changed at a time, and which of those
cannot run on this device (a GPU kernel on the CPU, cuDNN with packed rows, Pallas on a JAX without it)."""

import dataclasses

from benchmarks.spec import REMATS, BenchSpec, hf_config
from jaxlora.errors import UserError

# The groups of `--features`: model.attention x packing, train.remat, and the other speed switches.
FEATURE_GROUPS = ("attention", "remat", "switches")


def feature_specs(base: BenchSpec, gpu: bool, groups=FEATURE_GROUPS) -> list[BenchSpec]:
    """The preset's defaults, then one switch changed at a time, the most telling first (a time box cuts
    from the end): model.attention with packing off and on ("attention"), the other train.remat policies
    ("remat"), then the other speed switches ("switches"). Every attention is listed whatever the device:
    `skip_reasons` says which cannot run here, or repeat the default row.
    """
    unknown = set(groups) - set(FEATURE_GROUPS)
    if unknown:
        raise UserError(f"unknown feature groups {sorted(unknown)}; choose from {', '.join(FEATURE_GROUPS)}")

    def attention(impl, packed):
        return "attention", f"attention={impl} packing={'on' if packed else 'off'}", impl, packed

    rows = [("", "default", {})]
    # Unpacked rows: is the default's kernel the fastest? Packed rows (data.packing): which kernel then?
    # cuDNN cannot keep packed examples apart; auto then runs jaxlora's Pallas kernel.
    attn = [attention(a, False) for a in ("cudnn", "xla")]
    attn += [attention(a, True) for a in ("xla", "pallas", "reference")]
    rows += [(g, label, {"attention": a, "packed": p}) for g, label, a, p in attn]
    # minimal is full by another name; offload needs a GPU (the device's features run has one)
    remats = [r for r in REMATS if r not in (base.remat, "minimal") and (r != "offload" or gpu)]
    rows += [("remat", f"remat={r}", {"remat": r}) for r in remats]
    attn = [attention("pallas", False), attention("reference", False), attention("cudnn", True)]
    rows += [(g, label, {"attention": a, "packed": p}) for g, label, a, p in attn]
    rows += [
        ("switches", "loss_chunk=256", {"loss_chunk": 256}),
        ("switches", f"loss_chunk={base.batch * base.seq}", {"loss_chunk": base.batch * base.seq}),
        ("switches", "no scan (unrolled)", {"scan_layers": False}),
        ("switches", "no donation", {"donate": False}),
        ("switches", "no prefetch", {"prefetch": False}),
        ("switches", "host sync every step", {"sync_every_step": True}),
    ]
    # Does the CPU's custom-VJP LoRA product pay on the GPU too? Does the plain one on the CPU?
    product = "cpu" if gpu else "plain"
    rows.append(("switches", f"lora_product={product}", {"lora_product": product}))
    return [base.replace(name=f"{base.name} {label}", **kw) for g, label, kw in rows if g in ("", *groups)]


def skip_reasons(specs: list[BenchSpec], backend: str) -> dict[str, str]:
    """{name: why} for the specs not to measure on `backend`: the model.attention a spec names cannot run
    its case here (`jaxlora.models.attention.choose`: cuDNN with packed rows, a GPU kernel on the CPU,
    the Pallas kernel on a JAX without it), or it is the same measurement as an earlier spec once `auto` is
    resolved (the default row already runs that kernel).
    """
    # Imported here: the PEFT worker process imports this module and must not load JAX.
    from jaxlora.models.attention.choose import choose_attention
    from jaxlora.models.config import config_from_hf

    reasons: dict[str, str] = {}
    seen: dict[tuple, BenchSpec] = {}
    for spec in specs:
        cfg = config_from_hf(hf_config(spec)).with_runtime(
            compute_dtype=spec.dtype, attention=spec.attention, remat=spec.remat, packed=spec.packed
        )
        try:
            impl = choose_attention(cfg, spec.dtype, spec.seq, backend)
        except UserError as err:
            reasons[spec.name] = str(err)
            continue
        same = seen.setdefault(dataclasses.astuple(spec.replace(name="", attention=impl)), spec)
        if same is not spec:
            reasons[spec.name] = (
                f"the same measurement as {same.name!r} (model.attention={same.attention} runs {impl} here)"
            )
    return reasons
