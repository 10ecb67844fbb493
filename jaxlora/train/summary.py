"""The console summaries of a run: what it trains (start) and where its results are (end)."""

import jax
import numpy as np

from jaxlora.quant import count_params
from jaxlora.train.memory_plan import peak_line


def data_lines(cfg, examples, loader) -> list[str]:
    """Examples (or preference pairs) and tokens of the training data, how many reach seq_len and
    whether longer ones were truncated (always for pairs, as TRL), and how they pack."""
    lengths = getattr(examples, "lengths", None)
    if lengths is None:
        return ["data: streamed (examples and tokens unknown until read)"]
    pairs = hasattr(loader, "loaders")  # a PairLoader: the lengths are the chosen sides'
    lengths = np.asarray(lengths)
    what = "preference pairs" if pairs else "examples"
    tokens = f"{int(lengths.sum()):,} tokens" + (" (chosen sides)" if pairs else "")
    lines = [f"data: {len(lengths):,} {what}, {tokens}; {_at_limit(lengths, cfg, pairs)}"]
    per_epoch = loader.num_batches_per_epoch
    if cfg.data.packing and per_epoch and not pairs:
        rows = per_epoch * cfg.train.batch_size
        lines.append(
            f"packing: {len(lengths):,} examples packed into {rows:,} rows of {cfg.data.seq_len} tokens"
        )
    return lines


def _at_limit(lengths: np.ndarray, cfg, pairs: bool) -> str:
    """ "382 reach data.seq_len 512 (truncated)", or "none reaches data.seq_len 128"."""
    seq_len = cfg.data.seq_len
    n = int(np.sum(lengths >= seq_len))
    if n == 0:
        return f"none reaches data.seq_len {seq_len}"
    verb = "reaches" if n == 1 else "reach"
    truncated = " (truncated)" if pairs or cfg.data.truncation else ""
    return f"{n:,} {verb} data.seq_len {seq_len}{truncated}"


def _examples(loader):
    """The training examples a loader reads (the chosen sides of preference pairs), or None."""
    if hasattr(loader, "examples"):
        return loader.examples
    inner = getattr(loader, "loaders", None)  # a PairLoader: one loader per side
    return inner[0].examples if inner else None


def _validation_line(data) -> str:
    """ "validation: 47 examples" (or preference pairs), or "validation: none"."""
    if data.val is None or not hasattr(data.val, "__len__"):
        return "validation: none"
    what = "preference pairs" if hasattr(data.val, "rejected") else "examples"
    return f"validation: {len(data.val):,} {what}"


def start_summary(cfg, plan, base, data, lora, total_steps: int, first_step: int, memory=None) -> str:
    """The lines printed once by process 0 before the first step; `memory`: the compiled train step's
    figures (`jaxlora.train.memory_plan.step_memory`), printed as its peak per device."""
    trainable = count_params(lora)
    total = count_params(base.params) + trainable
    t = cfg.train
    effective = t.batch_size * t.grad_accum_steps
    per_epoch = data.loader.num_batches_per_epoch
    epochs = f"{total_steps * t.grad_accum_steps / per_epoch:.2f}" if per_epoch else "?"
    quant = cfg.quant.weights if cfg.quant.weights != "none" else "none"
    lines = [
        f"model: {base.name} ({cfg.model.dtype}, compute {cfg.model.compute_dtype or cfg.model.dtype}, "
        f"quant {quant})",
        f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.4f}%)",
        *data_lines(cfg, _examples(data.loader), data.loader),
        _validation_line(data),
        f"steps: {total_steps:,} ({epochs} epochs), effective batch {effective} "
        f"({t.batch_size} x {t.grad_accum_steps} accumulation), {jax.device_count()} devices, "
        f"{plan.describe()}",
    ]
    if memory is not None:
        lines.append(peak_line(memory))
    if first_step:
        lines.append(f"resuming at step {first_step}")
    return "\n".join(lines)


def end_summary(run_path, adapter_from: str | None, best, curves: list[str]) -> str:
    """Where the run's results are: the adapter, the best checkpoint, the curves."""
    lines = []
    if adapter_from is not None:
        lines.append(f"adapter: {run_path / 'adapter'} (from the {adapter_from})")
    if best is not None and best.best_step is not None:
        lines.append(
            f"best checkpoint: step {best.best_step}, eval loss {best.best_loss:.4f} "
            f"({run_path / 'best_checkpoint' / str(best.best_step)})"
        )
    if curves:
        lines.append("curves: " + ", ".join(curves))
    return "\n".join(lines)
