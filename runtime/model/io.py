"""The model checkpoint folder: DIR/plan.json, DIR/model.safetensors, DIR/tokenizer.json.

`save_model` writes it; `load_model` reads it back, or a training run directory (its final model
RUN_DIR/model/, or its newest complete checkpoint when the run has no final model or one of an
earlier step, as when a finished run is resumed for more steps and stopped), or a training
checkpoint RUN_DIR/checkpoints/step-N (runtime/train/checkpoint.py: the model's weights without the
optimizer state, the spec from its meta.json, the tokenizer of the run's prepared data).
State-dict names are the llmc Transformer's own.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmc.compiler.errors import UserError

from ..folders import (check_model_source, is_checkpoint, is_model_folder, latest_checkpoint,  # noqa: F401
                       model_spec_from_plan, read_plan)  # (torch-free; also this module's API)
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


def _train_checkpoint():
    from ..train import checkpoint  # (torch.distributed.checkpoint: imported only when needed)
    return checkpoint


def resolve_model_dir(path) -> Path:
    """DIR itself when it holds plan.json and model.safetensors or is a training checkpoint; of a
    training run directory, the newer by training step of its final model DIR/model and its newest
    complete checkpoint (a finished run resumed for more steps and stopped before its end keeps the
    old final model), saying so on stderr when it is the checkpoint."""
    path = Path(path)
    check_model_source(path)
    if is_model_folder(path) or is_checkpoint(path):
        return path
    final = path / "model" if is_model_folder(path / "model") else None
    ckpt = latest_checkpoint(path)
    if final is not None and (ckpt is None or not _older(final, ckpt)):
        return final
    why = "it has no final model" if final is None else f"its final model is of step {model_step(final)}"
    _note(f"note: {path}: {why} ({path / 'model'}): using its newest complete checkpoint, {ckpt}")
    return ckpt


def _older(final: Path, ckpt: Path) -> bool:
    """Model folder `final` holds an earlier step than checkpoint `ckpt` (a model that records no
    step, an earlier llmc's, is taken as the newer)."""
    step = model_step(final)
    return step is not None and step < _train_checkpoint().read_meta(ckpt)["step"]


def model_step(model_dir) -> int | None:
    """The training step whose weights a model folder holds (save_model's `step`, in the safetensors
    header), None when it records none (imported, quantized, or an unreadable file)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError):
        return None  # (read_weights names a damaged file when the model is loaded)
    return int(step) if step is not None and step.isdigit() else None


_noted: set[str] = set()


def _note(message: str) -> None:
    """`message` on stderr, once per process (a verb may resolve the same path several times)."""
    if message not in _noted:
        _noted.add(message)
        print(message, file=sys.stderr)


def tokenizer_file(model_dir) -> Path | None:
    """tokenizer.json of a model folder (None when it has none). Of a training checkpoint: its run's
    final model's, else its prepared data's (found as training finds it, with data.cache_dir relative
    to the working directory), refused when neither is there."""
    model_dir = Path(model_dir)
    if not is_checkpoint(model_dir):
        return model_dir / "tokenizer.json" if (model_dir / "tokenizer.json").is_file() else None
    final = model_dir.parent.parent / "model" / "tokenizer.json"
    if final.is_file():
        return final
    from llmc.compiler.spec import Spec

    from ..data.prepare import prepared_dir
    spec = Spec.model_validate(_train_checkpoint().checkpoint_plan(model_dir)["spec"])
    try:
        prepared = prepared_dir(spec) / "tokenizer.json"
    except (OSError, UserError):  # its data sources are gone: their fingerprint names the folder
        prepared = None
    if prepared is None or not prepared.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json for this checkpoint (not in {final.parent}, nor in the "
                        f"run's prepared data under {Path(spec.data.cache_dir).resolve()}); run from the folder "
                        "the run was trained in, with its data sources in place")
    return prepared


def plain_name(name: str) -> str:
    """A state-dict name without the parts wrappers insert (torch.compile's _orig_mod, DDP's module)."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_PARTS)


def save_model(model: Transformer, plan: dict, out_dir, tokenizer=None, step: int | None = None) -> Path:
    """Write plan.json, model.safetensors and (when given) tokenizer.json into out_dir.

    tokenizer: a `tokenizers.Tokenizer`, or the path of a tokenizer.json to copy. step: the training
    step of these weights, recorded in the safetensors header (model_step). Written to a
    temporary name first and renamed, so a half-written file never carries the final name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {plain_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"} if step is None else {"format": "pt", "step": str(step)}
    _atomic(out / "model.safetensors", lambda p: save_file(state, str(p), metadata=metadata))
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


def build_model(plan: dict, device="cpu", dtype=None, init: bool = True) -> Transformer:
    """A Transformer for a plan, built on meta and materialised on `device`: initialised, or with
    only its computed buffers set when `init` is False (for weights that are loaded over it)."""
    with torch.device("meta"):
        model = Transformer(model_spec_from_plan(plan))
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:
        model.init_buffers()
    if _dtype(dtype) is not None:
        model.to(_dtype(dtype))
    return model


def read_weights(path, device="cpu") -> dict:
    """The tensors of a safetensors file, refused with its path when the file is damaged."""
    from safetensors import SafetensorError
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def read_tokenizer(model_dir):
    """tokenizer.json of a model folder (None when it has none), refused when it is damaged."""
    path = tokenizer_file(model_dir)
    if path is None:
        return None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
        raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None


def load_state(model, state: dict, path, unsaved: str | None = None, assign: bool = False) -> None:
    """Load `state` into `model` (strict=False), refused when names or shapes differ from the plan's
    model; parameters named `*{unsaved}` may be absent (placeholders that are not stored). `assign`:
    the model takes the state's tensors themselves (a model built on meta needs no memory of its own)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as e:  # shapes that differ from the plan's
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise UserError(f"{path} does not match its plan.json: {detail}") from None
    if unsaved:
        missing = [k for k in missing if not k.endswith(unsaved)]
    if missing or unexpected:
        raise UserError(f"{path} does not match its plan.json: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_model(path, device="cpu", dtype=None):
    """(model, plan_dict, tokenizer or None) from a model folder, run directory or training checkpoint.

    A model folder's weights become the model's own tensors (built on meta, nothing initialised or
    copied): loading takes the memory of the weights once. dtype: torch dtype or "fp32" / "bf16";
    default: the parameters' as stored (fp32 when they differ).
    """
    model_dir = resolve_model_dir(path)
    if is_checkpoint(model_dir):
        plan = _train_checkpoint().checkpoint_plan(model_dir)
        model = build_model(plan, device, init=False)  # DCP reads into the model's own tensors
        _train_checkpoint().load_model_weights(model_dir, model)
    else:
        plan = read_plan(model_dir)
        with torch.device("meta"):
            model = Transformer(model_spec_from_plan(plan))
        weights = model_dir / "model.safetensors"
        load_state(model, read_weights(weights, device), weights, assign=True)
        model.init_buffers(device)
    stored = {p.dtype for p in model.parameters() if p.is_floating_point()}
    model.to(_dtype(dtype) or (stored.pop() if len(stored) == 1 else torch.float32))
    return model, plan, read_tokenizer(model_dir)
