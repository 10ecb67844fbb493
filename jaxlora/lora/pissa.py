"""PiSSA and OLoRA: adapters initialized from the base weights, which lose that part (PEFT's meanings).

With W the torch-layout weight [out, in] of a targeted layer and s its scale (alpha / r):

    pissa          W = V S Uh (SVD); lora_A = sqrt(S_r / s) Uh_r [r, in], lora_B = V_r sqrt(S_r / s) [out, r]
    pissa_niter_N  the same from a randomized SVD with N subspace iterations (PEFT uses torch's svd_lowrank)
    olora          W = Q R; lora_A = R_r [r, in], lora_B = Q_r [out, r]

and the base becomes the residual `W - s * lora_B @ lora_A`, so the model is unchanged at step 0. In jaxlora
the residual is `unmerge(params, initial, scale)`: training runs on it, and the exported adapter is
converted as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` does (`converted`):
`A' = [A; A0]`, `B' = [B, -B0]`, r and alpha doubled, so that it applies to the *original* base.
Written with numpy/jax linear algebra (no PEFT code runs here); singular vectors may differ from PyTorch's
in sign, which changes A and B together and leaves every product, the residual and the outputs the same.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.quant import QuantizedTensor

PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


def is_base_changing(init: str) -> bool:
    """True for the inits that move part of the base weights into the adapter (pissa*, olora)."""
    return init in ("pissa", "olora") or PISSA_NITER.match(init) is not None


def _svd_lowrank(w: np.ndarray, r: int, niter: int, key: jax.Array) -> tuple[np.ndarray, ...]:
    """Randomized SVD (Halko et al., subspace iteration), w [m, n] -> (U [m, r], S [r], V [n, r])."""
    g = np.asarray(jax.random.normal(key, (w.shape[1], r), jnp.float32), np.float64)
    q, _ = np.linalg.qr(w @ g)
    for _ in range(niter):
        q, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ q)
    u, s, vh = np.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vh.T


def init_one(kernel: np.ndarray, r: int, scale: float, init: str, key: jax.Array) -> tuple[np.ndarray, ...]:
    """One layer: kernel [in, out] (jaxlora layout) -> (a [in, r], b [r, out]) float32, PEFT's formulas."""
    w = np.asarray(kernel, np.float64).T  # [out, in], PEFT's weight
    if init == "olora":
        q, rr = np.linalg.qr(w)
        lora_a, lora_b = rr[:r], q[:, :r]  # [r, in], [out, r]
    else:
        niter = PISSA_NITER.match(init)
        if niter is None:
            v, s, uh = np.linalg.svd(w, full_matrices=False)
            v, s, uh = v[:, :r], s[:r], uh[:r]
        else:
            v, s, u = _svd_lowrank(w, r, int(niter.group(1)), key)
            uh = u.T
        root = np.sqrt(s / scale)
        lora_a, lora_b = root[:, None] * uh, v * root[None, :]
    return lora_a.T.astype(np.float32), lora_b.T.astype(np.float32)


def init_from_base(kernel, ranks: np.ndarray, scales: np.ndarray, init: str, key: jax.Array, where: str):
    """A stacked module: kernel [L, in, out] -> (a [L, in, r], b [L, r, out]) with r = max(ranks); a layer
    with rank 0 (not adapted) gets zeros, a smaller rank is zero-padded."""
    if isinstance(kernel, QuantizedTensor):
        raise UserError(
            f"lora.init {init} on the quantized {where}: as in PEFT, PiSSA/OLoRA are initialized on the "
            "float weights; train it on an unquantized base (quant.weights: none)"
        )
    kernel = np.asarray(jax.device_get(kernel), np.float32)
    n, fan_in, fan_out = kernel.shape
    r_max = int(ranks.max())
    a = np.zeros((n, fan_in, r_max), np.float32)
    b = np.zeros((n, r_max, fan_out), np.float32)
    for i in np.flatnonzero(ranks):
        r = int(ranks[i])
        a[i, :, :r], b[i, :r] = init_one(kernel[i], r, float(scales[i]), init, jax.random.fold_in(key, i))
    return jnp.asarray(a), jnp.asarray(b)


def converted(a, b, a0, b0) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's `subtract_mutated_init` for one layer: a, a0 [in, r], b, b0 [r, out] -> a' [in, 2r],
    b' [2r, out] with a' @ b' = a @ b - a0 @ b0 (the update relative to the original base)."""
    return np.concatenate([a, a0], axis=-1), np.concatenate([b, -b0], axis=-2)


def convert_to_lora(lora: dict, initial: dict, ranks: dict, lora_cfg):
    """(lora', lora_cfg') of the plain LoRA that gives, on the original base, what `lora` gives on the
    residual base: per layer `converted` (each layer's own rank, zero-padded), r and alpha doubled
    (alpha x sqrt(2) with rsLoRA; pattern values doubled), so every scale is unchanged. `ranks`:
    (group, name) -> [L] ranks (`module_ranks`)."""
    out: dict = {}
    for group, mods in lora.items():
        for name, leaf in mods.items():
            a, b = np.asarray(leaf["a"], np.float32), np.asarray(leaf["b"], np.float32)
            a0, b0 = np.asarray(initial[group][name]["a"]), np.asarray(initial[group][name]["b"])
            n, r = a.shape[0], a.shape[-1]
            a2 = np.zeros((n, a.shape[1], 2 * r), np.float32)
            b2 = np.zeros((n, 2 * r, b.shape[-1]), np.float32)
            for i, r_i in enumerate(ranks[(group, name)]):
                if r_i:
                    ai, bi = converted(a[i, :, :r_i], b[i, :r_i], a0[i, :, :r_i], b0[i, :r_i])
                    a2[i, :, : 2 * r_i], b2[i, : 2 * r_i] = ai, bi
            out.setdefault(group, {})[name] = {**leaf, "a": a2, "b": b2}
    rslora = lora_cfg.use_rslora
    new_cfg = lora_cfg.model_copy(
        update={
            "r": 2 * lora_cfg.r,
            "alpha": lora_cfg.alpha * (2**0.5 if rslora else 2),
            "rank_pattern": type(lora_cfg.rank_pattern)({k: 2 * v for k, v in lora_cfg.rank_pattern.items()}),
            "alpha_pattern": type(lora_cfg.alpha_pattern)(
                {k: 2 * v for k, v in lora_cfg.alpha_pattern.items()}
            ),
            "init": "default",
        }
    )
    return out, new_cfg
