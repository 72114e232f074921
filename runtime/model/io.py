"""The model checkpoint folder: DIR/plan.json, DIR/model.safetensors, DIR/tokenizer.json.

`save_model` writes it; `load_model` reads it back (or a training run directory, whose final
model lives in RUN_DIR/model/). State-dict names are the llmc Transformer's own.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmc.compiler.errors import UserError

from .components import WRAPPER_PARTS
from .transformer import Transformer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def model_spec_from_plan(plan: dict):
    """The ModelSpec of a plan.json document (the runtime never reads TOML)."""
    from pydantic import ValidationError

    from llmc.compiler.spec import ModelSpec
    try:
        return ModelSpec.model_validate(plan["spec"]["model"])
    except (KeyError, TypeError, ValidationError) as e:
        raise UserError(f"plan.json has no valid spec.model table ({str(e).splitlines()[0]})") from None


def resolve_model_dir(path) -> Path:
    """DIR itself when it holds plan.json, else DIR/model (a training run directory)."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "plan.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UserError(f"{path} is not an llmc model folder (expected plan.json and model.safetensors "
                    f"in it or in {path / 'model'})")


def plain_name(name: str) -> str:
    """A state-dict name without the parts wrappers insert (torch.compile's _orig_mod, DDP's module)."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_PARTS)


def save_model(model: Transformer, plan: dict, out_dir, tokenizer=None) -> Path:
    """Write plan.json, model.safetensors and (when given) tokenizer.json into out_dir.

    tokenizer: a `tokenizers.Tokenizer`, or the path of a tokenizer.json to copy. Written to a
    temporary name first and renamed, so a half-written file never carries the final name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {plain_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _atomic(out / "plan.json", lambda p: p.write_text(json.dumps(plan, indent=2)))
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            _atomic(out / "tokenizer.json", lambda p: shutil.copyfile(tokenizer, p))
        else:
            _atomic(out / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    return out


def _atomic(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def build_model(plan: dict, device="cpu", dtype=None) -> Transformer:
    """An initialised Transformer for a plan, built on meta and materialised on `device`."""
    with torch.device("meta"):
        model = Transformer(model_spec_from_plan(plan))
    model.to_empty(device=device)
    model.init_weights()
    if _dtype(dtype) is not None:
        model.to(_dtype(dtype))
    return model


def read_plan(model_dir) -> dict:
    """plan.json of a model folder, refused with its path when it is not a JSON object."""
    path = Path(model_dir) / "plan.json"
    try:
        plan = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise UserError(f"{path}: not a readable plan.json ({e})") from None
    if not isinstance(plan, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(plan).__name__}")
    return plan


def read_weights(path, device="cpu") -> dict:
    """The tensors of a safetensors file, refused with its path when the file is damaged."""
    from safetensors import SafetensorError
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def read_tokenizer(model_dir):
    """tokenizer.json of a model folder (None when it has none), refused when it is damaged."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
        raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None


def load_state(model, state: dict, path, unsaved: str | None = None) -> None:
    """Load `state` into `model` (strict=False), refused when names or shapes differ from the plan's
    model; parameters named `*{unsaved}` may be absent (placeholders that are not stored)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ from the plan's
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise UserError(f"{path} does not match its plan.json: {detail}") from None
    if unsaved:
        missing = [k for k in missing if not k.endswith(unsaved)]
    if missing or unexpected:
        raise UserError(f"{path} does not match its plan.json: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_model(path, device="cpu", dtype=None):
    """(model, plan_dict, tokenizer or None) from a model folder or a run directory.

    dtype: torch dtype or "fp32" / "bf16"; default: as stored.
    """
    model_dir = resolve_model_dir(path)
    plan = read_plan(model_dir)
    model = build_model(plan, device)
    state = read_weights(model_dir / "model.safetensors", device)
    load_state(model, state, model_dir / "model.safetensors")
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    target = _dtype(dtype) or (stored.pop() if len(stored) == 1 else None)
    if target is not None:
        model.to(target)
    return model, plan, read_tokenizer(model_dir)
