"""`Runtime`: how a decoder runs (compute dtype, attention kernel, remat, ...), apart from what it is.

None of it is in the checkpoint: the run config chooses it (`model.compute_dtype`, `model.attention`,
`train.remat`, `data.packing`), and `DecoderConfig.with_runtime` sets it. Frozen and hashable, so the
`DecoderConfig` holding it stays a static argument of jitted functions.
"""

import dataclasses

import jax

from jaxlora.errors import UserError

ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")  # see jaxlora.models.attention
# What each keeps: `jaxlora.models.remat`; "minimal" is "full" by another name.
REMAT_POLICIES = ("none", "fast", "dots", "lean", "full", "minimal", "offload")
LORA_PRODUCTS = ("plain", "cpu", "auto")  # see Runtime.lora_product
MOE_IMPLS = ("auto", "ragged", "dense")  # see Runtime.moe_impl
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("", "cpu", "gpu")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The run-time choices of a decoder; every value is checked when the object is made."""

    compute_dtype: str = "float32"
    # One of ATTENTION_IMPLS; "auto" is resolved per case at trace time (jaxlora.models.attention.choose).
    attention: str = "auto"
    # True when training rows may hold several packed examples (data.packing): cuDNN then cannot run.
    # False: one example per row, right-padded (segment ids 1 then 0).
    packed: bool = True
    # What the backward pass keeps and what it recomputes; one of REMAT_POLICIES.
    remat: str = "lean"
    # The LoRA product (x @ A) @ B: "plain" under autodiff, "cpu" with the backward pass written for
    # XLA:CPU (`jaxlora.models.lora_product`), "auto" = "cpu" when JAX runs on the CPU, else "plain".
    lora_product: str = "auto"
    # False: a Python loop over the layers instead of `lax.scan` (compile time grows with depth).
    scan_layers: bool = True
    # Experts: "ragged" sorts tokens by expert and runs a grouped matmul (`lax.ragged_dot`), "dense" runs
    # every expert on every token and keeps the routed ones (cheaper for a handful of tiny experts),
    # "auto" = dense on the CPU or for at most 8 experts of width <= 256, else ragged (jaxlora.models.moe).
    moe_impl: str = "auto"
    # The backend the step is traced for: "" = the one JAX runs on here; "gpu" traces the GPU code paths
    # (attention kernels, LoRA product, experts) on any machine, to lower or plan a GPU step on a CPU.
    backend: str = ""

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.lora_product not in LORA_PRODUCTS:
            raise UserError(
                f"lora_product must be one of {', '.join(LORA_PRODUCTS)}, got {self.lora_product!r}"
            )
        if self.moe_impl not in MOE_IMPLS:
            raise UserError(f"moe_impl must be one of {', '.join(MOE_IMPLS)}, got {self.moe_impl!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.backend not in BACKENDS:
            raise UserError(f"backend must be cpu or gpu (or empty for JAX's own), got {self.backend!r}")
        if self.remat == "offload" and self.target_backend != "gpu":
            raise UserError(
                f"train.remat=offload moves the saved layer inputs to pinned host memory, which needs a GPU; "
                f"JAX runs on {self.target_backend!r} here: use train.remat=minimal (the same recomputation, "
                "inputs kept on the device)"
            )

    @property
    def target_backend(self) -> str:
        """`backend`, or the backend JAX runs on here ("cpu", "gpu", "tpu")."""
        return self.backend or jax.default_backend()
