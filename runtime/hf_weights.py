"""Hugging Face checkpoints <-> llmc model folders (weights, plan.json, tokenizer.json).

`import_checkpoint(HF_DIR, OUT, imported)` is what `llmc import hf HF_DIR -o OUT` runs (reached
lazily from `llmc.compiler.hf`); `export_main` is `llmc export hf CKPT -o DIR`. The name/layout
mapping is data (`hf_tables.py`, one table per family); `Adapter` applies a table to one model:
renames, stacks per-expert tensors, splits GPT-2's fused c_attn, transposes its Conv1D weights,
and permutes DeepSeek's interleaved RoPE rows into the rotate-half layout llmc's model uses.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmc.compiler.errors import UserError
from llmc.compiler.spec import ModelSpec

from .folders import output_folder, plan_chat_template, staged_folder
from .hf_tables import DEEPSEEK_MTP_COPIES, IGNORED_HF, TABLES, Rule

_FIELDS = {"i": r"(?P<i>\d+)", "k": r"(?P<k>\d+)", "p": r"(?P<p>weight|bias)"}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for field, group in _FIELDS.items():
        regex = regex.replace(re.escape("{" + field + "}"), group)
    return re.compile(regex + "$")


def _rope_order(dim: int) -> torch.Tensor:
    """Interleaved pairs (0,1), (2,3), ... -> rotate-half halves: evens first, then odds."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))


class Adapter:
    """A family's table applied to one ModelSpec: llmc tensors from HF tensors and back."""

    def __init__(self, family: str, m: ModelSpec, rope_interleaved: bool = True):
        self.family, self.m = family, m
        self.rope_interleaved = rope_interleaved and family.startswith("deepseek")
        table = {name: rule if isinstance(rule, Rule) else Rule(rule) for name, rule in TABLES[family].items()}
        self.rules = [(_pattern(name), rule) for name, rule in table.items()]
        self.n_experts = m.moe.n_experts if m.moe else 0

    def rule(self, name: str) -> tuple[Rule, dict]:
        """The rule for an llmc tensor name and the template fields it binds."""
        for pattern, rule in self.rules:
            match = pattern.match(name)
            if match:
                fields = match.groupdict()
                if "k" in fields:
                    fields["m"] = self.m.n_layers + int(fields["k"])
                return rule, fields
        raise UserError(f"the {self.family} table has no entry for llmc tensor {name!r}")

    def hf_names(self, name: str) -> list[str]:
        """HF tensor names the llmc tensor `name` is made from (one per expert for stacked experts)."""
        rule, fields = self.rule(name)
        if "{e}" in rule.hf:
            return [rule.hf.format(**fields, e=e) for e in range(self.n_experts)]
        return [rule.hf.format(**fields)]

    # ------------------------------------------------------------ one tensor, both directions
    def _permute_rope(self, w: torch.Tensor, kind: str, inverse: bool) -> torch.Tensor:
        a = self.m.attention
        order = _rope_order(a.qk_rope_head_dim)
        if inverse:
            order = torch.argsort(order)
        if kind == "kv":
            return torch.cat((w[:a.kv_lora_rank], w[a.kv_lora_rank:][order]))
        heads = w.view(self.m.n_heads, a.qk_nope_head_dim + a.qk_rope_head_dim, -1)
        nope, rope = heads.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=1)
        return torch.cat((nope, rope[:, order]), dim=1).reshape(w.shape)

    def to_llmc(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The llmc tensor `name` from the HF tensors named by hf_names(name), in that order."""
        rule, _ = self.rule(name)
        out = []
        for t in tensors:
            if rule.split:
                part, parts, dim = rule.split
                t = t.chunk(parts, dim=dim)[part]
            if rule.transpose:
                t = t.t()
            if rule.rope_rows and self.rope_interleaved:
                t = self._permute_rope(t, rule.rope_rows, inverse=False)
            if rule.swap_halves:
                t = torch.cat(t.chunk(2, dim=1)[::-1], dim=1)
            out.append(t)
        t = torch.stack(out) if "{e}" in rule.hf else out[0]
        return t.contiguous().clone() if rule.split else t.contiguous()

    def to_hf(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor, tuple | None]]:
        """(HF name, tensor, split) pieces of the llmc tensor; split pieces are joined by the caller."""
        rule, _ = self.rule(name)
        pieces = list(t.unbind(0)) if "{e}" in rule.hf else [t]
        out = []
        for hf_name, piece in zip(self.hf_names(name), pieces):
            if rule.swap_halves:
                piece = torch.cat(piece.chunk(2, dim=1)[::-1], dim=1)
            if rule.rope_rows and self.rope_interleaved:
                piece = self._permute_rope(piece, rule.rope_rows, inverse=True)
            if rule.transpose:
                piece = piece.t()
            out.append((hf_name, piece.contiguous(), rule.split))
        return out

    # ------------------------------------------------------------ whole state dicts
    def state_to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An llmc state dict as HF tensors (fused tensors joined, DeepSeek's MTP copies added)."""
        hf: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[int, torch.Tensor]] = {}
        split_of: dict[str, tuple] = {}
        for name, t in state.items():
            for hf_name, piece, split in self.to_hf(name, t):
                if split is None:
                    hf[hf_name] = piece
                else:
                    parts.setdefault(hf_name, {})[split[0]] = piece
                    split_of[hf_name] = split
        for hf_name, pieces in parts.items():
            _, n, dim = split_of[hf_name]
            hf[hf_name] = torch.cat([pieces[j] for j in range(n)], dim=dim).contiguous()
        if self.family.startswith("deepseek"):
            self._deepseek_extras(state, hf)
        return hf

    def _deepseek_extras(self, state: dict, hf: dict) -> None:
        m = self.m
        for k in range(m.mtp.depth):  # DeepSeek keeps its own copy of embedding and head per MTP layer
            for llmc_name, template in DEEPSEEK_MTP_COPIES.items():
                source = state.get(llmc_name, state["embed.weight"])  # tied: the embedding is the head
                hf[template.format(m=m.n_layers + k)] = source.clone()
        if m.moe is not None and m.moe.balance != "aux_free":  # transformers always has the buffer
            for i in range(m.n_layers):
                if m.is_moe_layer(i):
                    hf[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = torch.zeros(m.moe.n_experts)


class HFCheckpoint:
    """The safetensors of a HF model folder, sharded (model.safetensors.index.json) or not, read lazily."""

    def __init__(self, folder: Path, fp8_block: tuple[int, int] = (128, 128)):
        self.fp8_block = fp8_block
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                document = json.loads(index.read_bytes())
            except ValueError as e:
                raise UserError(f"{index}: not valid JSON ({e})") from None
            weight_map = document.get("weight_map") if isinstance(document, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise UserError(f"{index}: expected an object with a 'weight_map' of tensor name -> file name")
            self.file_of = {name: folder / file for name, file in weight_map.items()}
        else:
            self.file_of = {}
            # Mistral's folders also hold consolidated.safetensors (its own format): prefer model*.
            files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
            for file in files:
                with _open_safetensors(file) as f:
                    self.file_of.update({name: file for name in f.keys()})
        if not self.file_of:
            raise UserError(f"{folder}: no safetensors weights (model.safetensors or an index)")
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self.file_of)

    def resolve(self, name: str) -> str | None:
        """The stored name of `name`: itself, or without the `transformer.` prefix (GPT-2 on the Hub)."""
        if name in self.file_of:
            return name
        short = name.removeprefix("transformer.")
        return short if short in self.file_of else None

    def _read(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = _open_safetensors(file)
        try:
            return self._open[file].get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{file}: cannot read tensor {name} ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`; fp8 weights with a `name_scale_inv` beside them come back dequantised."""
        t = self._read(name)
        if f"{name}_scale_inv" in self.file_of:
            t = dequantise_fp8(t, self._read(f"{name}_scale_inv"), self.fp8_block)
        return t


def _open_safetensors(file: Path):
    """safe_open, with a damaged or missing file (an index may name one) as a UserError naming it."""
    if not file.is_file():
        raise UserError(f"{file}: weights file not found")
    try:
        return safe_open(str(file), "pt")
    except SafetensorError as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None


def dequantise_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's fp8 release format: each block x block tile of `weight` times its scale, in bf16."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return (weight.float() * scale).to(torch.bfloat16)


def convert_state(checkpoint: HFCheckpoint, adapter: Adapter, names: list[str]) -> tuple[dict, list[str]]:
    """llmc tensors `names` from the checkpoint; and warnings about HF tensors left unused."""
    quantised = [n for n in checkpoint.names() if n.endswith((".qweight", ".scales", ".qzeros", ".absmax"))]
    if quantised:
        raise UserError(f"the checkpoint holds quantised weights (e.g. {quantised[0]}); llmc imports "
                        "bf16/fp16/fp32 weights and DeepSeek's block-wise fp8: dequantise it first")
    state, missing, used = {}, [], set()
    for name in names:
        sources = [checkpoint.resolve(n) or n for n in adapter.hf_names(name)]
        absent = [n for n in sources if checkpoint.resolve(n) is None]
        if absent:
            missing += absent
            continue
        used.update(sources + [f"{n}_scale_inv" for n in sources])
        state[name] = adapter.to_llmc(name, [checkpoint.get(n) for n in sources])
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise UserError(f"the checkpoint lacks tensors its config.json implies: {shown}")
    left = sorted(n for n in checkpoint.names() - used if not any(re.match(p, n) for p in IGNORED_HF))
    if adapter.m.tie_embeddings:  # some tied checkpoints store the head anyway: it is the embedding
        left = [n for n in left if n != "lm_head.weight"]
    warnings = []
    if adapter.family.startswith("deepseek"):  # the MTP copies of embedding and head are duplicates
        left = [n for n in left if not re.search(r"\.(embed_tokens|shared_head\.head)\.weight$", n)]
        nonzero = [n for n in left if n.endswith("e_score_correction_bias") and checkpoint.get(n).abs().max() > 0]
        left = [n for n in left if not n.endswith("e_score_correction_bias")]
        if nonzero:
            warnings.append(f"routing correction biases dropped (moe.balance is not aux_free): {nonzero[0]} ...")
    if left:
        warnings.append(f"{len(left)} checkpoint tensors not used: {', '.join(left[:6])}")
    return state, warnings


def import_checkpoint(folder: Path, out: Path, imported) -> None:
    """Convert the HF checkpoint in `folder` into the llmc model folder `out`."""
    from llmc.compiler.hf import import_spec
    from llmc.compiler.hf_chat import chat_template_of
    from llmc.compiler.spec import Spec

    from .data.tokenizer import load_tokenizer
    from .model import Transformer
    from .model.io import save_model

    out = output_folder(out, folder)
    tokenizer = Path(folder) / "tokenizer.json"
    if tokenizer.is_file():
        load_tokenizer(tokenizer)  # a damaged one is refused here, not copied into the model folder
    quantisation = imported.hf.get("quantization_config") or {}
    checkpoint = HFCheckpoint(Path(folder), tuple(quantisation.get("weight_block_size", (128, 128))))
    m = imported.model
    if m.mtp.depth and checkpoint.resolve(f"model.layers.{m.n_layers}.eh_proj.weight") is None:
        print(f"warning: the checkpoint has no MTP weights (model.layers.{m.n_layers}.*): imported with "
              "mtp.depth = 0", file=sys.stderr)
        m = m.model_copy(update={"mtp": m.mtp.model_copy(update={"depth": 0})})
        imported.model = m
    data, note = import_spec(imported, chat_template=chat_template_of(Path(folder)))
    if note:
        print(f"note: {note}", file=sys.stderr)
    spec = Spec.model_validate(data)
    with torch.device("meta"):
        model = Transformer(spec.model)
    adapter = Adapter(imported.family, spec.model, bool(imported.hf.get("rope_interleave", True)))
    state, warnings = convert_state(checkpoint, adapter, list(model.state_dict()))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"the checkpoint's tensors do not fit the model its config.json describes: {e}") from None
    plan = _plan_document(spec)
    with staged_folder(out) as tmp:
        save_model(model, plan, tmp, tokenizer=tokenizer if tokenizer.is_file() else None)


def _plan_document(spec) -> dict:
    """plan.json of the imported spec (without a layout when its placeholder run fits nowhere)."""
    from llmc.compiler.plan import build_plan

    return build_plan(spec, strict=False).model_dump(mode="json")


def export_checkpoint(checkpoint, out: Path) -> dict:
    """Write the llmc model folder (or run directory) `checkpoint` as a HF model folder; its config."""
    from llmc.compiler.hf import model_to_hf
    from llmc.compiler.hf_chat import ChatTemplateError, conversation_template

    from .data.tokenizer import text_prefix
    from .model.io import load_model, resolve_model_dir, tokenizer_file

    model_dir = resolve_model_dir(checkpoint)
    out = output_folder(out, checkpoint, model_dir)
    if (model_dir / "quantization.json").is_file():
        raise UserError(f"{checkpoint} is a quantized checkpoint (llmc quantize); export the checkpoint it was "
                        "quantized from")
    model, plan, tokenizer = load_model(checkpoint)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtypes = {t.dtype for t in state.values() if t.is_floating_point() and t.dim() > 1}
    dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    config = model_to_hf(model.cfg, dtype=dtype)
    token_ids, token_names = _special_tokens(tokenizer) if tokenizer is not None else ({}, {})
    config.update(token_ids)
    family = config["model_type"]
    if model.cfg.mtp.depth and not family.startswith("deepseek"):
        print("warning: MTP modules dropped (only DeepSeek's format stores them)", file=sys.stderr)
        state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    tensors = Adapter(family, model.cfg).state_to_hf(state)
    tokenizer_json = tokenizer_file(model_dir)  # (a training checkpoint's: its run's)
    with staged_folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **token_names}
            bos = token_names.get("bos_token")
            begins = bos is not None and text_prefix(tokenizer) == [tokenizer.token_to_id(bos)]  # (Llama's)
            try:
                tokenizer_config["chat_template"] = conversation_template(plan_chat_template(plan), bos=begins)
            except ChatTemplateError as e:
                print(f"warning: data.tokenizer.chat_template is not exported: {e}", file=sys.stderr)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config) + "\n")
    return config


def _special_tokens(tokenizer) -> tuple[dict, dict]:
    """config.json's bos/eos/pad token ids and tokenizer_config.json's token strings. The eos ids
    are the tokens llmc's generation stops at (end of text, ChatML's end of turn), so that
    transformers' `generate` stops where `llmc generate` does."""
    from .data.tokenizer import special_ids

    ids = special_ids(tokenizer)
    eos = [i for i in (ids["eos"], ids["im_end"]) if i is not None]
    config = {"bos_token_id": ids["bos"], "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
              "pad_token_id": ids["pad"]}
    names = {f"{role}_token": tokenizer.id_to_token(ids[role]) for role in ("bos", "eos", "pad")
             if ids[role] is not None}
    return {k: v for k, v in config.items() if v is not None}, names


def export_main(args) -> int:
    """`llmc export hf CKPT -o DIR`."""
    config = export_checkpoint(args.checkpoint, Path(args.output))
    written = ", ".join(sorted(p.name for p in Path(args.output).iterdir()))
    print(f"wrote {args.output}/ ({config['model_type']}: {written})", file=sys.stderr)
    return 0
