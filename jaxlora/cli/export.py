"""`scripts/export.py`: an adapter folder or a training run, exported as PEFT or as a merged checkpoint."""

import os
import shutil
from pathlib import Path

from huggingface_hub import hf_hub_download

from jaxlora.config import load_config
from jaxlora.errors import UserError
from jaxlora.lora import save_merged
from jaxlora.lora.pissa import is_base_changing
from jaxlora.lora.tokens import RESIZED, resized_entry
from jaxlora.models.config import ModelSource, read_source
from jaxlora.models.loading import DTYPES, load_model, model_source
from jaxlora.models.saving import TOKENIZER_FILES, DiskFull, check_out_dir
from jaxlora.peft import load_peft_adapter, read_adapter_config, save_peft_adapter
from jaxlora.peft.adapter import check_lora_fits
from jaxlora.quant import make_quantizer
from jaxlora.train.checkpoint import restore_lora
from jaxlora.train.state import initial_adapter, residual_base
from jaxlora.train.vocab import TOKENIZER_DIR as RUN_TOKENIZER_DIR
from jaxlora.train.vocab import grow_base, read_run_vocab, resolve_token_texts

FORMATS = ("peft", "merged")


def _model_source(model: str) -> ModelSource:
    """A local model folder and its config.json, or a hub model's config.json (downloading that file only)."""
    folder = Path(os.path.expanduser(model))
    if not folder.is_dir():
        try:
            folder = Path(hf_hub_download(model, "config.json")).parent
        except Exception:  # not a hub id, offline, unknown or gated repo
            return model_source(model)  # raises the loader's one-line error
    return read_source(folder, model)


def lora_from_run(run_dir) -> tuple:
    """The LoRA tree of a training run's latest checkpoint: `(run Config, lora tree, step)`.

    Reads `run_dir/config.yaml` (the resolved config the trainer saved) and only the LoRA part of
    `run_dir/checkpoints/<latest step>`.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: no config.yaml; is this a jaxlora run folder (train output_dir)?")
    cfg = load_config(run / "config.yaml")
    lora, step = restore_lora(run / "checkpoints")  # UserError when the run saved no checkpoint
    return cfg, lora, step


def run_export(
    adapter: str | None,
    model: str | None,
    fmt: str,
    out: str,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    quant: str | None = None,
    quant_block_size: int | None = None,
    run: str | None = None,
) -> Path:
    """Export an adapter folder, or a training run's latest checkpoint, for base `model` as `fmt` into `out`.

    "peft": re-save the adapter in normalized PEFT form (explicit target list, float32 tensors, only the
    adapted layers), checked against the model's dimensions; only config.json is read. "merged": load the
    model, merge the adapter and write a full HF checkpoint (`dtype` as in `save_merged`). For an adapter
    trained on a quantized base (QLoRA), pass the training's `quant` ("int8"/"nf4"/"mxfp4") and
    `quant_block_size`: the base is quantized the same way and the update is added to those dequantized
    weights. With `run` (a training output_dir), the model and the quant settings default to the run's config.
    What the merged export would refuse (a non-empty `out`, an adapter for another model) is refused
    before any weights load. A multimodal checkpoint's text tower exports as the whole model: the adapter
    loads onto it with PEFT, and the merged checkpoint carries its other towers unchanged. `DiskFull`
    when the space runs out.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    lora = lora_cfg = folder = step = None
    if run is not None:
        run_cfg, lora, step = lora_from_run(run)
        lora_cfg = run_cfg.lora
        model = model or run_cfg.model.path
        if quant is None:
            quant, quant_block_size = run_cfg.quant.weights, run_cfg.quant.block_size
    elif adapter is None:
        raise UserError("pass --adapter DIR (a PEFT LoRA adapter folder) or --run OUTPUT_DIR")
    else:  # fail on a bad adapter before loading any weights
        folder = Path(read_adapter_config(adapter)["_folder"])
    if model is None:
        raise UserError("pass --model PATH_OR_ID (the base model the adapter was trained on)")
    quant = quant or "none"
    try:
        if run is not None and (RUN_TOKENIZER_DIR in os.listdir(run) or is_base_changing(lora_cfg.init)):
            return _export_run_with_base(run, run_cfg, lora, model, fmt, out, overwrite, dtype, quant)
        return _export(
            adapter, folder, model, fmt, out, overwrite, dtype, quant, quant_block_size, lora, lora_cfg
        )
    except DiskFull as err:
        what = "the adapter" if fmt == "peft" else "the merged model"
        raise err.said(f"writing {what}" + ("" if step is None else f" of step {step}")) from None


def _export(adapter, folder, model, fmt, out, overwrite, dtype, quant, quant_block_size, lora, lora_cfg):
    """`run_export` of an adapter folder (`lora` None) or of a run's LoRA tree, on the base alone."""
    if fmt == "peft":
        if quant != "none" and lora is None:  # an adapter folder, not a run
            raise UserError("--quant applies to --format merged only")
        cfg = _model_source(model).config
        if lora is None:
            lora, lora_cfg = load_peft_adapter(adapter, cfg)
        path = save_peft_adapter(out, lora, lora_cfg, cfg, model, overwrite=overwrite)
        for name in TOKENIZER_FILES if folder is not None else ():  # saved beside the adapter in training
            if (folder / name).is_file():
                shutil.copyfile(folder / name, path / name)
        return path
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = _model_source(model).config  # what the merge would refuse, before the weights load
    check_out_dir(out, overwrite)
    if lora is None:
        lora, lora_cfg = load_peft_adapter(adapter, source)
    else:
        check_lora_fits(source, lora, lora_cfg)
    m = load_model(model, quantizer=make_quantizer(quant, quant_block_size))
    tokenizer_src = folder if folder is not None and (folder / "tokenizer_config.json").is_file() else None
    return save_merged(out, m, lora, lora_cfg, tokenizer_src, dtype=dtype, overwrite=overwrite)


def _export_run_with_base(run, run_cfg, lora, model: str, fmt, out, overwrite, dtype, quant) -> Path:
    """A run whose export needs its base loaded: one with tokens added to the tokenizer (the base grown by
    the rows it drew, its tokenizer saved beside the export), or a PiSSA/OLoRA run trained on the residual
    base `W - s A0 B0` (the PEFT export converted against the step-0 adapter so that it applies to the
    original base; the merged export adds the adapter to the residual)."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _model_source(model)  # a model type jaxlora does not load, refused before the weights load
    check_out_dir(out, overwrite)
    if is_base_changing(run_cfg.lora.init) and quant != "none":
        raise UserError(
            f"--quant {quant} with a lora.init {run_cfg.lora.init} run: its adapter is computed from the "
            "float weights, so its export needs them too; export with --quant none"
        )
    tokenizer, rows = read_run_vocab(Path(run))
    m = load_model(model, quantizer=make_quantizer(quant, run_cfg.quant.block_size))
    before = m.config.vocab_size
    if rows is not None:
        m, _ = grow_base(m, before + rows["embed"].shape[0], run_cfg.seed, rows)
        lora = {**lora, RESIZED: resized_entry(m.params, m.config)}
    if tokenizer is not None:
        run_cfg = resolve_token_texts(run_cfg, tokenizer, before)
    initial = initial_adapter(run_cfg, m.config, m.params) if is_base_changing(run_cfg.lora.init) else None
    if fmt == "peft":
        path = save_peft_adapter(
            out, lora, run_cfg.lora, m.config, model, overwrite=overwrite, initial_lora=initial
        )
    else:
        if initial is not None:
            m.params = residual_base(m.params, initial, run_cfg, m.config)
        tok_dir = Path(run) / RUN_TOKENIZER_DIR
        path = save_merged(out, m, lora, run_cfg.lora, tok_dir if tokenizer else None, dtype, overwrite)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
