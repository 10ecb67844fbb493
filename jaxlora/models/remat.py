"""Rematerialization: what each `train.remat` policy (`Runtime.remat`) keeps for the backward pass.

Between layers the residual stream is kept in the compute dtype (as transformers keeps it); inside a layer
it is summed in float32. The layer (`jaxlora.models.decoder.block`) tags its activations with
`checkpoint_name` (layer_input, query, key, value, attention_residuals, mlp_input, mlp_gate, mlp_up,
residual); a policy other than "none" wraps each layer in `jax.checkpoint`. Per token and layer, for
Llama-3.1-8B in bfloat16 (D 4096, KV 1024, F 14336; measured by benchmarks/remat_plan.py):

    none     no jax.checkpoint: the backward pass reads everything the forward pass computed. Most memory.
    fast     the large matmul outputs: q, k, v after RoPE, the attention kernel's residuals (output and
             log-sum-exp), the residual stream after attention and the MLP's gate and up (~92 KB).
             Recomputes norms, RoPE, activations, dropout masks and the rank-r LoRA products x @ A.
    dots     every matmul output without batch dimensions; recomputes the attention forward too.
    lean     the default: the layer input, k and v after RoPE and the attention kernel's residuals
             (~20 KB). Recomputes q, the output projection and the MLP; not the attention forward.
    full     the layer input only (8 KB); recomputes the whole layer. `minimal` is the same policy.
    offload  as full, with the layer inputs moved to pinned host memory (GPU; `Runtime` refuses it
             elsewhere) and brought back one layer at a time in the backward pass.
"""

import jax

from jaxlora.models.attention import RESIDUALS

LAYER_INPUT = "layer_input"
FAST_SAVED = ("query", "key", "value", RESIDUALS, "mlp_input", "mlp_gate", "mlp_up")
LEAN_SAVED = (LAYER_INPUT, "key", "value", RESIDUALS)
# Training rows longer than MLP_TILE positions run the dense MLP in tiles under these policies (`tiled_mlp`).
MLP_TILE = 4096
TILED_REMATS = ("lean", "full", "minimal", "offload")
_policies = jax.checkpoint_policies
REMAT = {
    "none": None,
    "fast": _policies.save_only_these_names(*FAST_SAVED),
    "dots": _policies.dots_with_no_batch_dims_saveable,
    "lean": _policies.save_only_these_names(*LEAN_SAVED),
    "full": _policies.nothing_saveable,
    "minimal": _policies.nothing_saveable,
    "offload": _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=(LAYER_INPUT,),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def after_cotangent(layer):
    """`layer` (a rematerialized layer function) whose backward pass recomputes only once its output's
    cotangent exists.

    Where one program runs several layers one after another (a hybrid model's period of P layers in one
    scan step, or every layer unrolled), nothing in the data flow orders the layers' recomputations:
    each needs only its saved inputs, so XLA may run them all before the first layer's backward pass
    and hold P layers' activations at once (a Qwen3.5 period of 4 planned 10.1 GiB where one DeltaNet
    layer per step plans 3.5). Here the forward pass saves what `jax.vjp` of the layer keeps (its
    policy's residuals) and the backward pass passes them through one `optimization_barrier` with the
    cotangent before it recomputes.
    """

    @jax.custom_vjp
    def run(*args):
        return layer(*args)

    def forward(*args):
        return jax.vjp(layer, *args)  # (output, the vjp function: a pytree of the saved residuals)

    def backward(vjp, cotangent):
        vjp, cotangent = jax.lax.optimization_barrier((vjp, cotangent))
        return vjp(cotangent)

    run.defvjp(forward, backward)
    return run
