"""Generation with the KV cache: same tokens as recomputing everything, batches equal single
prompts, stop rules, the cache's size, and the `llmc generate` / `llmc chat` verbs."""

import json
import subprocess
import sys

import pytest
import torch

from llmc.compiler.cli import main as llmc
from llmc.runtime.infer.cache import build_cache
from llmc.runtime.infer.generate import generate, generate_without_cache
from llmc.runtime.infer.sampling import SamplingParams
from test_infer_checkpoints import (one_thread, DENSE, GPT2, MIXTRAL, QWEN, checkpoint,  # noqa: F401
                                    random_model, spec_with)


PROMPTS = [[5, 17, 300, 2, 9, 41, 7], [88, 0, 3], [1] * 12 + [250, 251], [400]]   # 0 is also the padding id


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen", "mixtral"])
def model(request):
    overrides = {"llama": DENSE, "gpt2": GPT2, "qwen": QWEN, "mixtral": MIXTRAL}[request.param]
    return random_model(spec_with(overrides), seed=1)


def test_cached_generation_equals_recomputing_everything(model):
    params = SamplingParams(max_new_tokens=16)
    for prompt in PROMPTS:
        assert generate(model, [prompt], params)[0].tokens == generate_without_cache(model, prompt, params)


def test_sampled_cached_generation_equals_recomputing_everything(model):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=3)
    for prompt in PROMPTS[:2]:
        assert generate(model, [prompt], params)[0].tokens == generate_without_cache(model, prompt, params)


def test_each_row_of_a_batch_equals_its_prompt_alone(model):
    greedy = SamplingParams(max_new_tokens=16)
    batch = generate(model, PROMPTS, greedy, keep_logits=True)
    for prompt, row in zip(PROMPTS, batch):
        alone = generate(model, [prompt], greedy, keep_logits=True)[0]
        assert row.tokens == alone.tokens
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(row.logits, alone.logits))
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11, repetition_penalty=1.5)
    batch = generate(model, PROMPTS, sampled)
    assert [r.tokens for r in batch] == [generate(model, [p], sampled)[0].tokens for p in PROMPTS]


def test_stop_token_and_max_new_tokens(model):
    free = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=10))[0]
    assert len(free.tokens) == 10 and free.stop_reason == "length"
    stop_at = free.tokens[4]
    first = free.tokens.index(stop_at)
    stopped = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=10, stop_tokens=(stop_at,)))[0]
    assert stopped.tokens == free.tokens[:first] and stopped.stop_reason == "stop_token"


def test_prompt_longer_than_the_context_is_a_user_error(model):
    from llmc.compiler.errors import UserError
    with pytest.raises(UserError, match="context"):
        generate(model, [[1] * 300], SamplingParams())


def test_a_prompt_too_long_is_named_by_its_number(model):
    """In a batch (a prompts file of many lines) the error says which prompt is too long: 'a
    prompt has 300 tokens' left the user to find it."""
    from llmc.compiler.errors import UserError
    with pytest.raises(UserError, match=r"^prompt 3 has 300 tokens; the model's context is 256 tokens"):
        generate(model, [[1] * 5, [2] * 7, [1] * 300, [3] * 4], SamplingParams())


def test_kv_cache_holds_exactly_k_and_v_per_token():
    spec = spec_with(DENSE)
    m = spec.model
    cache = build_cache(random_model(spec), batch=3, max_len=50, dtype=torch.bfloat16)
    # hand formula: 2 (k and v) x layers x kv heads x head dim x 2 bytes, per token
    per_token = 2 * m.n_layers * m.kv_heads * (m.d_model // m.n_heads) * 2
    assert per_token == 2 * 2 * 2 * 16 * 2
    assert cache.nbytes() == per_token * 3 * 50
    plan_memory = _plan_kv_bytes_per_token(spec)
    if plan_memory is not None:
        assert cache.nbytes() == plan_memory * 3 * 50


def _plan_kv_bytes_per_token(spec):
    from llmc.compiler.plan import build_plan
    memory = build_plan(spec).model_dump(mode="json").get("memory")
    return memory["inference"]["kv_cache_bytes_per_token"] if memory else None


# ---------------------------------------------------------------- the verbs

def test_generate_verb_json_for_a_prompt_and_a_file(tmp_path, capsys):
    ckpt = checkpoint(tmp_path)
    assert llmc(["generate", str(ckpt), "--prompt", "def wrap(text", "--max-new-tokens", "8", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert set(one) >= {"text", "tokens", "tokens_per_s"} and one["tokens"] <= 8
    assert not one["text"].startswith("def wrap")          # new text only
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def wrap(text\n\nclass TextWrapper:\n你好\n", encoding="utf-8")
    assert llmc(["generate", str(ckpt), "--prompts-file", str(prompts), "--max-new-tokens", "6", "--json"]) == 0
    many = json.loads(capsys.readouterr().out)
    assert isinstance(many, list) and len(many) == 3
    assert many[0]["text"] == one["text"][:len(many[0]["text"])]   # the same greedy start, batch or not


def test_generate_verb_streams_text(tmp_path):
    ckpt = checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "generate", str(ckpt), "--prompt", "import",
                          "--max-new-tokens", "12"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stderr


def test_generate_verb_says_when_the_context_caps_new_tokens(tmp_path, capsys):
    ckpt = checkpoint(tmp_path)   # max_seq_len 256
    assert llmc(["generate", str(ckpt), "--prompt", "def", "--max-new-tokens", "1000", "--json"]) == 0
    from tokenizers import Tokenizer
    prompt = len(Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode("def", add_special_tokens=False).ids)
    out = capsys.readouterr()
    assert json.loads(out.out)["tokens"] <= 256 - prompt
    assert f"note: at most {256 - prompt} new tokens fit in the model's context of 256 tokens" in out.err


def test_generate_verb_errors_without_traceback(tmp_path, capsys):
    assert llmc(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    ckpt = checkpoint(tmp_path)
    assert llmc(["generate", str(ckpt), "--prompts-file", str(tmp_path / "none.txt")]) == 1
    assert llmc(["generate", str(ckpt), "--prompt", "x", "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_chat_verb_answers_each_line_and_ends_at_eof(tmp_path):
    ckpt = checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "chat", str(ckpt), "--max-new-tokens", "5",
                          "--temperature", "0"], input="hello\nhow are you?\n", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") >= 2 and "Traceback" not in out.stderr


def test_generate_verb_in_bf16(tmp_path, capsys):
    ckpt = checkpoint(tmp_path)
    assert llmc(["generate", str(ckpt), "--prompt", "class", "--max-new-tokens", "5", "--json", "--dtype", "bf16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] <= 5 and out["tokens_per_s"] > 0


def test_chat_prompt_holds_the_users_message_when_max_new_tokens_fills_the_context(tmp_path, monkeypatch, capsys):
    """chat's default --max-new-tokens (256) equals tiny.toml's context: the conversation must still
    reach the model (the prompt was cut to its last token, so every reply ignored what was typed)."""
    import io

    import llmc.runtime.infer.cli as infer_cli
    from tokenizers import Tokenizer

    ckpt = checkpoint(tmp_path)   # max_seq_len 256
    seen = []
    real_generate = infer_cli.generate

    def recording(model, prompts, params, *args, **kwargs):
        seen.append(prompts[0])
        return real_generate(model, prompts, params, *args, **kwargs)

    monkeypatch.setattr(infer_cli, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("please write a function\n"))
    assert llmc(["chat", str(ckpt), "--max-new-tokens", "256", "--temperature", "0"]) == 0
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert len(seen) == 1 and "please write a function" in tok.decode(seen[0], skip_special_tokens=False)
    capsys.readouterr()


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(tmp_path):
    """A line of stdin that does not decode is named and skipped; the next line is answered
    (the tokenizer's TypeError ended the chat with a traceback)."""
    ckpt = checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "llmc.compiler.cli", "chat", str(ckpt), "--max-new-tokens", "3",
                          "--temperature", "0"], input=b"caf\xe9 au lait\nhello\n", capture_output=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONIOENCODING": "utf-8"})
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, err
    assert "Traceback" not in err and err.count("error:") == 1 and "not UTF-8" in err
    assert out.stdout.endswith(b"\n")   # the reply to "hello"


def test_fp16_weights_compute_in_fp32_on_the_cpu_unless_told(tmp_path, capsys):
    """A CPU multiplies fp16 many times slower than fp32 or bf16: a model stored in fp16 (an
    imported fp16 checkpoint) generates in fp32 by default, the tokens of `--dtype fp32`, and says so."""
    from llmc.runtime.infer.cli import _load
    from llmc.runtime.model.io import load_model, save_model
    model, plan, tok = load_model(checkpoint(tmp_path))
    half = save_model(model.half(), plan, tmp_path / "half", tok)
    run = ["generate", str(half), "--prompt", "def wrap(text", "--max-new-tokens", "8", "--json", "--temperature", "0"]
    assert llmc(run) == 0
    default = capsys.readouterr()
    assert f"note: {half} is stored in fp16, which CPUs multiply slowly: computing in fp32" in default.err
    assert llmc(run + ["--dtype", "fp32"]) == 0
    explicit = capsys.readouterr()
    assert json.loads(default.out)["text"] == json.loads(explicit.out)["text"] and "fp16" not in explicit.err
    assert {p.dtype for p in _load(half)[0].parameters()} == {torch.float32}
    assert {p.dtype for p in _load(half, "bf16")[0].parameters()} == {torch.bfloat16}
