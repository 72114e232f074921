"""Hugging Face config.json <-> llmc spec, and the `llmc import hf` verb.

`hf_to_model(config)` reads a config.json (a dict) of one of the FAMILIES into the `[model]` table
of a spec; `model_to_hf(model)` writes the opposite direction (used by `llmc export hf`). Both read
the classic layout (`rope_theta`, `rope_scaling`) and transformers 5's (`rope_parameters`) and write
both, so that old and new transformers read what we write.

Weights are not touched here (this module never imports torch): `llmc import hf DIR -o OUT_DIR`
hands a checkpoint folder to `llmc.runtime.hf_weights`, imported lazily.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pydantic
import tomli_w

from .errors import UserError
from .hf_chat import chat_template_of
from .hf_export import export_family
from .hf_families import FAMILIES, ConfigReader
from .spec import ModelSpec, Spec

__all__ = ["FAMILIES", "Imported", "hf_to_model", "import_main", "model_to_hf", "read_config", "import_spec"]


@dataclass
class Imported:
    """The result of mapping a config.json: the family, the model table, what was lost."""

    family: str
    model: ModelSpec
    warnings: list[str]
    hf: dict  # the config.json as read (the weight converter needs e.g. rope_interleave)


def hf_to_model(config: dict) -> Imported:
    """Map a Hugging Face config.json (as a dict) to an llmc ModelSpec.

    Raises UserError naming every field that has no llmc equivalent; fields that the spec does
    not represent but that do not change the parameters or the forward pass much (e.g. Mistral's
    sliding_window) come back as warnings.
    """
    family = config.get("model_type")
    reader = ConfigReader(config)
    if family not in FAMILIES:
        unknown = reader.unrecognised_by_all()
        raise UserError(
            f"config.json: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)}); "
            f"fields that could not be mapped: model_type" + (f", {', '.join(unknown)}" if unknown else ""))
    table = FAMILIES[family](reader)
    reader.finish()  # raises UserError with every unmappable field; collects warnings
    try:
        model = ModelSpec.model_validate(table)
    except pydantic.ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'model'}: {err['msg']}" for err in e.errors())
        raise UserError(f"config.json ({family}) maps to an invalid llmc model: {details}") from None
    return Imported(family, model, reader.warnings, config)


def model_to_hf(model: ModelSpec, *, dtype: str = "float32") -> dict:
    """The config.json of the transformers family that has `model`'s architecture.

    Raises UserError when no supported family expresses the model (the message says which
    feature is the obstacle).
    """
    return export_family(model, dtype)


def read_config(source: str | Path) -> tuple[dict, Path | None]:
    """Read SOURCE (a config.json, or a folder holding one): the dict and the folder (or None)."""
    path = Path(source)
    folder = None
    if path.is_dir():
        folder, path = path, path / "config.json"
    if not path.is_file():
        raise UserError(f"{source}: no such file" if folder is None else f"{source}: no config.json in this folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config, folder


# The placeholder run of an imported spec: a short CPU run when the model fits one CPU, else
# nodes of 8 H100s, doubled until the planner finds a layout (so `llmc plan` works at once).
_CPU_RUN = {"seq_len": 2048, "global_batch_size": 8, "max_steps": 100}
_GPU_RUN = {"seq_len": 4096, "global_batch_size": 1024, "max_steps": 1000}
_MAX_NODES = 1024


def default_run(model: ModelSpec) -> tuple[dict, str | None]:
    """The tables besides [model] of an imported spec, and a note on the hardware chosen."""
    from .plan import build_plan

    def tables(run: dict, hardware: dict | None) -> dict:
        out = {"train": {**run, "seq_len": min(model.max_seq_len, run["seq_len"])}}
        return {**out, "hardware": hardware} if hardware else out

    def plans(data: dict) -> bool:
        try:
            spec = Spec.model_validate({"model": model.model_dump(mode="json", exclude_none=True), **data})
            return build_plan(spec, strict=False).layout is not None
        except (UserError, ImportError, pydantic.ValidationError):
            return False

    if plans(tables(_CPU_RUN, None)):
        return tables(_CPU_RUN, None), None
    nodes = 1
    while nodes <= _MAX_NODES:
        data = tables(_GPU_RUN, {"accelerator": "H100", "gpus_per_node": 8, "nodes": nodes})
        if plans(data):
            return data, (f"the model does not train on one CPU: the placeholder run uses {nodes} node(s) of "
                          "8 H100s, the fewest that fit; edit [hardware] and [train]")
        nodes *= 2
    return tables(_CPU_RUN, None), "no placeholder hardware fits this model; edit [hardware] and [train]"


def import_spec(imported: Imported, tokenizer: str | None = None,
                chat_template: str | None = None) -> tuple[dict, str | None]:
    """A whole spec (as TOML-ready data) around an imported model: the model table filled in,
    every other table left to its defaults but for a placeholder [train] (and [hardware] when
    the model needs GPUs) and the tokenizer and chat template given; and a note on that choice."""
    run, note = default_run(imported.model)
    data = {"model": imported.model.model_dump(mode="json", exclude_none=True), **run}
    tokenizer_table = {"path": tokenizer} if tokenizer else {}
    if chat_template and chat_template != "chatml":  # (ChatML is the default)
        tokenizer_table["chat_template"] = chat_template
    if tokenizer_table:
        data["data"] = {"tokenizer": tokenizer_table}
    Spec.model_validate(data)  # what we write must load
    return data, note


def _has_weights(folder: Path | None) -> bool:
    return folder is not None and (any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists())


def import_main(args) -> int:
    """`llmc import hf SOURCE [-o OUT]`: a spec from config.json, or a checkpoint from a HF folder."""
    config, folder = read_config(args.source)
    imported = hf_to_model(config)
    for warning in imported.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = Path(args.output) if args.output else None
    folder_given = out is not None and (out.is_dir() or args.output.endswith(("/", os.sep)))  # (Path drops the /)
    if folder_given and not _has_weights(folder):
        raise UserError(f"{args.source} has no safetensors weights to convert: give -o a spec file (.toml)")
    if out is not None and _has_weights(folder) and not out.suffix == ".toml":
        # A checkpoint: weights and tokenizer too. The runtime (torch) is imported only here.
        from llmc.runtime.hf_weights import import_checkpoint

        import_checkpoint(folder, out, imported)
        print(f"wrote {out}/ (plan.json, model.safetensors{', tokenizer.json' if (out / 'tokenizer.json').exists() else ''})",
              file=sys.stderr)
        return 0
    tokenizer = None
    if folder is not None and (folder / "tokenizer.json").is_file():
        tok = (folder / "tokenizer.json").resolve()
        # relative to the spec written (as spec paths are), absolute when printed
        tokenizer = str(tok) if out is None else os.path.relpath(tok, out.resolve().parent)
    data, note = import_spec(imported, tokenizer, chat_template_of(folder))
    if note:
        print(f"note: {note}", file=sys.stderr)
    text = tomli_w.dumps(data)
    header = f"# Imported by `llmc import hf` from a {imported.family} config.json\n"
    if out is None:
        sys.stdout.write(header + text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(header + text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    return 0
