"""`llmc generate`, `llmc chat` and `llmc quantize`: thin shells over generate / speculative / quantize."""

import json
import sys
from pathlib import Path

import torch

from llmc.compiler.errors import UserError

from ..allocator import keep_freed_memory
from ..data.tokenizer import encode_text
from .checkpoint import load_for_inference, quantize_checkpoint
from .generate import generate
from .sampling import SamplingParams


def _threads(model) -> None:
    # Decoding is latency bound: a small model's matmuls are too short to split across threads,
    # and on a busy machine the threads' barriers stall (measured: 30x slower on 2 shared cores).
    n_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if n_params < 50_000_000:
        torch.set_num_threads(1)


def _load(path, dtype=None):
    """(model, plan, tokenizer) on the CPU, computing in `dtype` (None: as stored, but fp16 weights
    in fp32: a CPU multiplies fp16 many times slower than either)."""
    keep_freed_memory()
    model, plan, tokenizer = load_for_inference(path, "cpu", dtype)
    if dtype is None and any(p.dtype == torch.float16 for p in model.parameters()):
        print(f"note: {path} is stored in fp16, which CPUs multiply slowly: computing in fp32 "
              "(--dtype bf16 takes half the memory)", file=sys.stderr)
        model.float()
    _threads(model)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer.json; generation needs one to encode prompts")
    return model, plan, tokenizer


def _stop_ids(tokenizer) -> tuple[int, ...]:
    from llmc.runtime.data.tokenizer import special_ids
    ids = special_ids(tokenizer)
    return tuple(i for i in (ids.get("eos"), ids.get("im_end")) if i is not None)


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise UserError(f"{path}: " + ("a folder, not a prompts file" if path.is_dir() else "prompts file not found"))
    try:
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not prompts:
        raise UserError(f"{path}: no prompts in it (expected one prompt per line)")
    return prompts


def generate_main(args) -> int:
    """Generate from one prompt (streamed to stdout) or a file of prompts (one batch)."""
    model, _, tokenizer = _load(args.checkpoint, getattr(args, "dtype", None))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            stop_tokens=_stop_ids(tokenizer), stop_strings=tuple(args.stop), seed=args.seed)
    texts = _read_prompts(args)
    prompts = [encode_text(tokenizer, t) for t in texts]
    room = model.cfg.max_seq_len - max(map(len, prompts), default=0)
    if 0 < room < params.max_new_tokens:  # (a prompt that leaves no room is refused by generate)
        print(f"note: at most {room} new tokens fit in the model's context of {model.cfg.max_seq_len} tokens "
              f"(--max-new-tokens {params.max_new_tokens})", file=sys.stderr)
    stream_live = not args.json and args.prompt is not None
    on_text = (lambda row, chunk: (sys.stdout.write(chunk), sys.stdout.flush())) if stream_live else None

    extra = [{} for _ in prompts]
    if args.draft:
        from .speculative import speculative_generate
        draft, _, draft_tok = _load(args.draft, getattr(args, "dtype", None))
        if draft.cfg.vocab_size != model.cfg.vocab_size or draft_tok.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"the draft {args.draft} does not share the target's tokenizer "
                            "(speculative decoding needs the same vocabulary)")
        results = []
        for i, p in enumerate(prompts):
            r = speculative_generate(model, draft, p, params, tokenizer, on_text=on_text)
            extra[i] = {"acceptance_rate": round(r.acceptance_rate, 4), "draft_tokens": r.draft_len}
            results.append(r)
    else:
        results = generate(model, prompts, params, tokenizer, on_text=on_text,
                           pad_id=_stop_ids(tokenizer)[0] if _stop_ids(tokenizer) else 0)

    if args.json:
        docs = [{"text": r.text, "tokens": len(r.tokens), "tokens_per_s": round(r.tokens_per_s, 2),
                 "token_ids": r.tokens, "stop_reason": r.stop_reason, **e} for r, e in zip(results, extra)]
        print(json.dumps(docs[0] if args.prompt is not None else docs, ensure_ascii=False))
        return 0
    if stream_live:
        print()
    else:
        for text, r in zip(texts, results):
            print(f"### {text}\n{r.text}\n")
    for r, e in zip(results, extra):
        note = f", acceptance {e['acceptance_rate']:.0%}" if e else ""
        print(f"[{len(r.tokens)} tokens, {r.tokens_per_s:.1f} tokens/s{note}]", file=sys.stderr)
    return 0


def chat_main(args) -> int:
    """An interactive loop: each line of stdin is a user turn; EOF (Ctrl-D) ends the chat."""
    from llmc.runtime.data.chat import ChatTemplate
    from llmc.runtime.folders import plan_chat_template
    model, plan, tokenizer = _load(args.checkpoint, getattr(args, "dtype", None))
    template = ChatTemplate(plan_chat_template(plan))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            stop_tokens=_stop_ids(tokenizer), seed=0)
    end_of_turn = template.parts("assistant")[1].strip()
    if end_of_turn:
        params.stop_strings = (end_of_turn,)
    messages: list[dict] = []
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # an undecodable byte arrives as a lone surrogate, not an exception
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            print("error: that line is not UTF-8 text; it was skipped", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        # The reply gets at most half the context, so the conversation always has the other half
        # (generate caps the reply at the room the prompt leaves).
        reply_room = min(params.max_new_tokens, model.cfg.max_seq_len // 2)
        ids = _chat_prompt(messages, template, tokenizer, model.cfg.max_seq_len - reply_room)
        params.seed += 1
        reply = generate(model, [ids], params, tokenizer,
                         on_text=lambda _, chunk: (sys.stdout.write(chunk), sys.stdout.flush()))[0]
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.text})
    return 0


def _chat_prompt(messages, template, tokenizer, budget: int) -> list[int]:
    """The conversation plus the assistant header in at most `budget` tokens, every message framed
    by its template's markers: the oldest turns go first, and a last message too long on its own
    keeps the end of its content (said on stderr), never a cut header."""
    from llmc.runtime.data.chat import render_chat
    from llmc.runtime.data.tokenizer import text_prefix
    from llmc.runtime.data.wording import counted

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids if text else []

    while True:
        ids = render_chat(messages, tokenizer, template, generation_prompt=True)[0]  # as SFT data is tokenized
        if len(ids) <= budget or len(messages) == 1:
            break
        messages[:] = messages[2:] if len(messages) > 2 else messages[1:]
    if len(ids) <= budget:
        return ids
    (message,) = messages
    head, foot = (encode(part) for part in template.parts(message["role"]))
    head = text_prefix(tokenizer) + head  # (Llama's BOS)
    reply_header = encode(template.parts("assistant")[0])
    frame = len(head) + len(foot) + len(reply_header)
    if frame >= budget:
        raise UserError(f"the chat template's markers alone take {counted(frame, 'token')}, and the prompt "
                        f"may have {budget} (the model's context less the reply's room)")
    content = encode(template.content(message))
    room = budget - frame
    print(f"note: your message ({counted(len(content), 'token')}) is longer than the {budget}-token prompt the "
          f"context leaves; the model sees only its last {counted(room, 'token')}", file=sys.stderr)
    return head + content[-room:] + foot + reply_header


def quantize_main(args) -> int:
    """Write an int8/int4 weight-only copy of a checkpoint and print its size."""
    from .quantize import QuantConfig
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric)
    out = quantize_checkpoint(args.checkpoint, args.output, cfg)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} (int{cfg.bits}, group {cfg.group_size}, "
          f"{'symmetric' if cfg.symmetric else 'asymmetric'}): {size / 2**20:.2f} MiB")
    return 0
