"""`llmc import hf DIR -o OUT` / `llmc export hf CKPT -o DIR` with weights: for a tiny randomly
initialised transformers model of every family, llmc's logits after import equal transformers'
(1e-4, fp32), and export -> transformers -> import gives back exactly the same tensors."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_hf_config import TINY, tiny_config  # noqa: E402

from llmc.compiler.cli import main as llmc  # noqa: E402
from llmc.compiler.errors import UserError  # noqa: E402
from llmc.compiler.hf import hf_to_model, read_config  # noqa: E402
from llmc.runtime.hf_weights import import_checkpoint  # noqa: E402
from llmc.runtime.model.io import load_model  # noqa: E402

torch.set_num_threads(2)
VOCAB = 128


def _perturb(model) -> None:
    """Random init leaves norms at 1 and biases at 0, which would hide a swapped or dropped
    tensor: move every one of them, and the DeepSeek routing-correction buffers too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.05)


def _untie_indexer(model) -> None:
    """DeepSeek-V3.2's indexer scores are relu(q.k): exact zeros whose order top-k breaks
    arbitrarily (differently for two equal implementations). Make every q.k positive so the
    selection is decided by the scores: positive-leaning inputs, queries and key offsets."""
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(3.0)
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_a_proj.weight.abs_()
            attn.indexer.wq_b.weight.abs_()
            attn.indexer.k_norm.bias[attn.indexer.qk_rope_head_dim:] = 2.0


def hf_model(family: str, seed: int = 0):
    """A tiny transformers model of the family with weights large enough to make attention
    sharp (so RoPE, scaling and masking mistakes show in the logits)."""
    config = tiny_config(family)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _perturb(model)
    if family == "deepseek_v32":
        _untie_indexer(model)
    return model


def write_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(TINY))
def test_import_matches_transformers_and_round_trips(family, tokens, tmp_path):
    reference = hf_model(family)
    reference.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf" / "tokenizer.json")

    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    model, plan, tokenizer = load_model(tmp_path / "llmc")
    model.eval()
    assert tokenizer is not None and tokenizer.get_vocab_size() == VOCAB
    expected = logits(reference, tokens)
    torch.testing.assert_close(logits(model, tokens), expected, atol=1e-4, rtol=0)

    # export -> transformers: the same tensors transformers saved, the same logits
    assert llmc(["export", "hf", str(tmp_path / "llmc"), "-o", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    original = reference.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    torch.testing.assert_close(logits(reloaded, tokens), expected, atol=1e-5, rtol=0)

    # ... -> import again: bit-identical llmc tensors
    assert llmc(["import", "hf", str(tmp_path / "exported"), "-o", str(tmp_path / "again")]) == 0
    again, _, _ = load_model(tmp_path / "again")
    first = model.state_dict()
    assert again.state_dict().keys() == first.keys()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, first[name]), name


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_a_bf16_import_is_as_close_to_fp32_as_transformers_bf16_at_long_positions(family, tmp_path):
    """A bf16 checkpoint, read by llmc as stored and by transformers in bf16: at positions 448-511
    llmc's logits are no further from transformers' fp32 ones than transformers' own bf16 (llama3
    RoPE scaling; DeepSeek's MLA with YaRN). With RoPE's frequencies cast to bf16, llmc's llama was
    14x further."""
    config = tiny_config(family)
    config.initializer_range, config.max_position_embeddings = 0.2, 1024
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    _perturb(reference)
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    model, _, _ = load_model(tmp_path / "llmc")
    assert model.embed.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (2, 512), generator=torch.Generator().manual_seed(1))

    def tail(model):  # the logits of positions 448-511
        return logits(model.eval(), tokens)[:, -64:].float()

    def hf(dtype):
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype)

    fp32 = tail(hf(torch.float32))
    error = {name: ((tail(m) - fp32).norm(dim=-1) / fp32.norm(dim=-1)).mean().item()
             for name, m in (("transformers", hf(torch.bfloat16)), ("llmc", model))}
    assert error["llmc"] < 1.5 * error["transformers"], error


def test_sharded_checkpoint(tokens, tmp_path):
    reference = hf_model("qwen2_moe")
    reference.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    model, _, _ = load_model(tmp_path / "llmc")
    torch.testing.assert_close(logits(model.eval(), tokens), logits(reference, tokens), atol=1e-4, rtol=0)


def test_gpt2_hub_names_without_prefix(tokens, tmp_path):
    """The Hub's gpt2 checkpoint names tensors `h.0.attn.c_attn.weight` (no `transformer.`)
    and carries the causal-mask buffers `h.N.attn.bias`."""
    reference = hf_model("gpt2")
    reference.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = safetensors_torch.load_file(str(file))
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    safetensors_torch.save_file(state, str(file), metadata={"format": "pt"})
    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    model, _, _ = load_model(tmp_path / "llmc")
    torch.testing.assert_close(logits(model.eval(), tokens), logits(reference, tokens), atol=1e-4, rtol=0)


def test_deepseek_mtp_round_trip(tmp_path):
    """MTP modules travel in DeepSeek's layout (extra layer n_layers + k with enorm, hnorm,
    eh_proj, shared_head); transformers ignores them, llmc reads them back exactly."""
    from llmc.runtime.hf_weights import export_checkpoint
    from llmc.runtime.model import Transformer
    from llmc.runtime.model.io import save_model

    imported = hf_to_model(json.loads(tiny_config("deepseek_v3").to_json_string()))
    assert imported.model.mtp.depth == 1
    torch.manual_seed(0)
    model = Transformer(imported.model)
    model.init_weights()
    _perturb(model)
    from llmc.compiler.hf import import_spec
    from llmc.compiler.spec import Spec
    spec = Spec.model_validate(import_spec(imported)[0])
    save_model(model, {"version": 1, "spec": spec.model_dump(mode="json")}, tmp_path / "llmc")
    export_checkpoint(tmp_path / "llmc", tmp_path / "hf")
    stored = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "model.layers.3.eh_proj.weight" in stored and "model.layers.3.shared_head.head.weight" in stored
    config, folder = read_config(tmp_path / "hf")
    import_checkpoint(folder, tmp_path / "again", hf_to_model(config))
    again, _, _ = load_model(tmp_path / "again")
    assert again.cfg.mtp.depth == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_missing_tensor_is_named(tmp_path):
    reference = hf_model("llama")
    reference.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = safetensors_torch.load_file(str(file))
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors_torch.save_file(state, str(file), metadata={"format": "pt"})
    config, folder = read_config(tmp_path / "hf")
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        import_checkpoint(folder, tmp_path / "llmc", hf_to_model(config))


def test_quantised_checkpoint_is_refused(tmp_path):
    reference = hf_model("llama")
    reference.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = safetensors_torch.load_file(str(file))
    state["model.layers.0.mlp.up_proj.qweight"] = torch.ones(1, dtype=torch.int32)  # GPTQ-style
    safetensors_torch.save_file(state, str(file), metadata={"format": "pt"})
    config, folder = read_config(tmp_path / "hf")
    with pytest.raises(UserError, match="quantised"):
        import_checkpoint(folder, tmp_path / "llmc", hf_to_model(config))


@pytest.mark.parametrize("spec_name, family", [("tiny.toml", "llama"), ("tiny_moe.toml", "deepseek_v3")])
def test_llmc_models_export_to_transformers(spec_name, family, repo, tmp_path):
    """The other direction of parity: a model llmc trains (the shipped tiny specs, randomly
    initialised) runs in transformers after export with the same logits."""
    from llmc.compiler.plan import build_plan
    from llmc.compiler.spec import load_spec
    from llmc.runtime.model import Transformer
    from llmc.runtime.model.io import save_model

    spec = load_spec(repo / "specs" / spec_name)
    torch.manual_seed(0)
    model = Transformer(spec.model)
    model.init_weights()
    _perturb(model)
    with torch.no_grad():  # sharper attention and routing than the default init, so mistakes show
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    model.eval()
    save_model(model, build_plan(spec).model_dump(mode="json"), tmp_path / "llmc")
    assert llmc(["export", "hf", str(tmp_path / "llmc"), "-o", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, spec.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(reference, tokens), logits(model, tokens), atol=1e-4, rtol=0)


def test_deepseek_rotate_half_checkpoint(tokens, tmp_path):
    """transformers' DeepSeek-V3 can also hold rotate-half RoPE rows (rope_interleave = false):
    those are llmc's layout already and must not be permuted."""
    config = tiny_config("deepseek_v3")
    config.rope_interleave = False
    config.initializer_range = 0.2
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    _perturb(reference)
    reference.save_pretrained(tmp_path / "hf")
    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    model, _, _ = load_model(tmp_path / "llmc")
    torch.testing.assert_close(logits(model.eval(), tokens), logits(reference, tokens), atol=1e-4, rtol=0)


def test_fp8_block_quantised_checkpoint(tmp_path):
    """DeepSeek releases fp8 weights with one scale per block x block tile (`weight_scale_inv`):
    import dequantises them (to bf16)."""
    reference = hf_model("llama")
    reference.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = safetensors_torch.load_file(str(file))
    block = 32
    expected = {}
    for name in [n for n, t in state.items() if t.dim() == 2 and ".layers." in n]:
        w = state[name]
        rows, cols = w.shape
        tiles = w.reshape(rows // block, block, cols // block, block)
        scale = tiles.abs().amax(dim=(1, 3)) / 448.0  # e4m3's largest value
        q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        state[name] = q.reshape(rows, cols)
        state[name + "_scale_inv"] = scale
        expected[name] = (q.float() * scale[:, None, :, None]).reshape(rows, cols).to(torch.bfloat16)
    safetensors_torch.save_file(state, str(file), metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert llmc(["import", "hf", str(tmp_path / "hf"), "-o", str(tmp_path / "llmc")]) == 0
    stored = safetensors_torch.load_file(str(tmp_path / "llmc" / "model.safetensors"))
    assert torch.equal(stored["layers.1.ffn.w3.weight"], expected["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(stored["layers.0.attn.wq.weight"], expected["model.layers.0.self_attn.q_proj.weight"])


def test_damaged_hf_folder_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    """Truncated or empty safetensors, an index that is not JSON or names a missing file, and a
    tokenizer.json that is not one: `llmc import hf` names the file in one error line (no
    SafetensorError / JSONDecodeError traceback) and writes no model folder."""
    reference = hf_model("llama")
    reference.save_pretrained(tmp_path / "good")
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()
    config = (tmp_path / "good" / "config.json").read_text()
    damages = {
        "model.safetensors": {"model.safetensors": weights[:5000]},
        "model.safetensors ": {"model.safetensors": b""},
        "model.safetensors.index.json": {"model.safetensors": weights, "model.safetensors.index.json": b"{nope"},
        "missing.safetensors": {"model.safetensors.index.json":
                                json.dumps({"weight_map": {"lm_head.weight": "missing.safetensors"}}).encode()},
        "tokenizer.json": {"model.safetensors": weights, "tokenizer.json": b"garbage"},
    }
    for i, (named, files) in enumerate(damages.items()):
        folder = tmp_path / f"hf{i}"
        folder.mkdir()
        (folder / "config.json").write_text(config)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        assert llmc(["import", "hf", str(folder), "-o", str(tmp_path / f"out{i}")]) == 1, named
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err, (named, err)
        assert named.strip() in err, (named, err)
        assert not (tmp_path / f"out{i}").exists(), named


def test_export_names_the_end_of_text_token_so_transformers_stops_there(tmp_path):
    """The exported config and tokenizer_config name the end-of-text token (and bos, pad; and
    ChatML's end of turn, where llmc's generate stops too): transformers' generate stops at it
    instead of running to max_new_tokens (the export had no eos_token_id / eos_token at all)."""
    from llmc.compiler.plan import build_plan
    from llmc.runtime.model.io import save_model
    from test_infer_checkpoints import DENSE, random_model, spec_with, tokenizer

    spec = spec_with(DENSE)
    model = random_model(spec)
    with torch.no_grad():
        model.head.weight.zero_()  # every logit 0: greedy picks id 0, the trained tokenizer's <|endoftext|>
    save_model(model, build_plan(spec).model_dump(mode="json"), tmp_path / "llmc", tokenizer=tokenizer())
    assert llmc(["export", "hf", str(tmp_path / "llmc"), "-o", str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tokenizer.eos_token, hf_tokenizer.bos_token, hf_tokenizer.pad_token) == \
        ("<|endoftext|>", "<|bos|>", "<|pad|>")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reference.generation_config.eos_token_id == [tokenizer().token_to_id("<|endoftext|>"),
                                                        tokenizer().token_to_id("<|im_end|>")]
    prompt = torch.tensor([hf_tokenizer("def f(x):").input_ids])
    out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == [0]  # the end-of-text token, then stopped
