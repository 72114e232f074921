"""Reading a checkpoint for inference (plain or quantized) and writing a quantized one.

A quantized checkpoint is a normal model folder (plan.json, tokenizer.json) whose
model.safetensors holds the quantized model's state dict (QuantLinear codes/scales/zeros, other
matrices under `parametrizations.<name>`), embeddings and vectors in bf16, plus `quantization.json`
({"bits", "group_size", "symmetric"}) that says how to rebuild the modules before loading.
MTP modules are left out: they only train (generation reads the main model), and the plan's
inference weights count the main model.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmc.compiler.errors import UserError

from ..folders import output_folder, staged_folder
from .quantize import QuantConfig, quantize_model, set_compute_dtype

QUANT_FILE = "quantization.json"


def _model_io():
    from llmc.runtime.model import io
    return io


def load_for_inference(path, device="cpu", dtype=None):
    """(model in eval mode, plan dict, tokenizer or None) from a model folder, run directory or
    training checkpoint."""
    io = _model_io()
    model_dir = io.resolve_model_dir(path)
    quant = model_dir / QUANT_FILE
    if not quant.is_file():
        model, plan, tokenizer = io.load_model(model_dir, device, dtype)
        return model.eval(), plan, tokenizer
    try:
        cfg = QuantConfig(**json.loads(quant.read_bytes()))
    except (ValueError, TypeError) as e:  # not JSON, not an object, or not the fields of a QuantConfig
        raise UserError(f"{quant}: not a readable {QUANT_FILE} ({e})") from None
    plan = io.read_plan(model_dir)
    with torch.device("meta"):  # the full-precision matrices are never made, only the quantized buffers
        model = io.Transformer(io.model_spec_from_plan(plan))
        model.mtp = torch.nn.ModuleList()   # not stored (see the module docstring)
        quantize_model(model, cfg, structure_only=True)
    model.to_empty(device=device)
    model.init_buffers()
    weights = model_dir / "model.safetensors"
    io.load_state(model, io.read_weights(weights, device), weights, unsaved=".original", assign=True)
    set_compute_dtype(model, io._dtype(dtype) or torch.float32)
    tokenizer = io.read_tokenizer(model_dir)
    return model.eval(), plan, tokenizer


def quantize_checkpoint(src, out, cfg: QuantConfig) -> Path:
    """Write a quantized copy of the checkpoint at `src` into `out`; returns the folder."""
    io = _model_io()
    model_dir = io.resolve_model_dir(src)
    out = output_folder(out, src, model_dir)
    if (model_dir / QUANT_FILE).is_file():
        raise UserError(f"{model_dir} is already quantized; quantize the original checkpoint")
    model, plan, _ = io.load_model(model_dir, "cpu")  # as stored: quantize_tensor reads each weight in fp32
    model.mtp = torch.nn.ModuleList()
    quantize_model(model, cfg)
    state = {}
    for name, t in model.state_dict().items():
        if t.numel() == 0:
            continue  # the placeholder under a parametrization: its data lives in the quantized buffers
        state[name] = (t.to(torch.bfloat16) if t.is_floating_point() and t.dtype != torch.bfloat16 else t)
        state[name] = state[name].contiguous()
    with staged_folder(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "llmc_quantization": f"int{cfg.bits}"})
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
        (tmp / QUANT_FILE).write_text(json.dumps({"bits": cfg.bits, "group_size": cfg.group_size,
                                                  "symmetric": cfg.symmetric}))
        if (tokenizer := io.tokenizer_file(model_dir)) is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    return out
