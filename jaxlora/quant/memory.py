"""Memory accounting of parameter trees: bytes, weight counts and the report printed at the start of a run."""

import math

import jax

from jaxlora.quant.tensor import QuantizedTensor, human_bytes, nbytes


def count_params(tree) -> int:
    """Number of weights `tree` stands for: a `QuantizedTensor` counts as its dense shape.

    The package's one parameter counter (also `jaxlora.lora.count_params`)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, QuantizedTensor))
    return sum(math.prod(a.shape) for a in leaves if hasattr(a, "shape"))


def memory_report(base, lora=None, opt_state=None) -> dict:
    """Bytes and weight counts of the frozen base, the LoRA params and the optimizer state.

    Keys: base_params, base_bytes, base_bf16_bytes (the base dense in bfloat16, for comparison),
    quantized_params, quantized_bytes (the part of the base held in `QuantizedTensor`s), lora_params,
    lora_bytes, opt_state_bytes, total_bytes (base + lora + opt_state).
    """
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    quantized = [a for a in jax.tree.leaves(base, is_leaf=is_q) if is_q(a)]
    report = {
        "base_params": count_params(base),
        "base_bytes": nbytes(base),
        "quantized_params": count_params(quantized),
        "quantized_bytes": nbytes(quantized),
        "lora_params": count_params(lora),
        "lora_bytes": nbytes(lora),
        "opt_state_bytes": nbytes(opt_state),
    }
    report["base_bf16_bytes"] = 2 * report["base_params"]
    report["total_bytes"] = report["base_bytes"] + report["lora_bytes"] + report["opt_state_bytes"]
    return report


def format_memory_report(report: dict) -> str:
    """A small text table of `memory_report`'s figures."""
    rows = [
        ("base", report["base_params"], report["base_bytes"]),
        ("  quantized", report["quantized_params"], report["quantized_bytes"]),
        ("  (base as bf16)", report["base_params"], report["base_bf16_bytes"]),
        ("lora", report["lora_params"], report["lora_bytes"]),
        ("optimizer state", None, report["opt_state_bytes"]),
        ("total", None, report["total_bytes"]),
    ]
    lines = [f"{'part':<16} {'weights':>10} {'bytes':>11}"]
    for part, n, b in rows:
        lines.append(f"{part:<16} {'' if n is None else _count(n):>10} {human_bytes(b):>11}")
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)
