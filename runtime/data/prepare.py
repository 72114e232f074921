"""`llmc data prepare SPEC`: sources -> tokenizer -> token shards + manifest, once.

The prepared data lives in `data.cache_dir/<fingerprint>/`. The fingerprint covers everything the
shards depend on (sources, their files' sizes and modification times, the tokenizer settings, the
split, the objective's format), so a second prepare of unchanged data finds `manifest.json` with the
same fingerprint and returns at once. Mixture weights are not part of it: they act at sampling time.

A document is its tokenizer's beginning of a text (`text_prefix`: Llama's BOS; nothing for llmc's
own tokenizer), its tokens, then the end-of-text token that packing separates documents with.

Split: every k-th document of a source (k = round(1 / val_fraction)) is held out for validation;
a source with fewer than k documents gives the last val_fraction of its tokens instead.

A given tokenizer that spells a source mostly with its unknown token would train to a loss that means
nothing: more than 1% unknown tokens is a warning, all of them an error (tokenizer.check_unknown).
"""

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from ...compiler.errors import UserError
from ..folders import init_folder, run_chat_template, staged_folder
from .chat import ChatTemplate, render_chat
from .shards import ShardWriter, split_tail, token_dtype
from .sources import BadRecords, DataError, iter_documents, source_files
from .tokenizer import (check_unknown, check_vocab, load_tokenizer, special_ids, text_prefix, train_tokenizer,
                        unknown_token)
from .wording import counted

FORMAT_VERSION = 3  # 2: a document begins as its tokenizer begins a text (a BOS for Llama's); 3: SFT tokenizes
#   the text before a reply as one string (runtime/data/chat.render_chat)
WORKERS = 2
_BATCH = 32


def _is_sft(spec) -> bool:
    return spec.train.objective == "sft"


def _field(source, sft: bool) -> str:
    """For SFT the jsonl key holds the conversation: `messages` unless the source names another."""
    return "messages" if sft and source.field == "text" else source.field


def fingerprint(spec) -> str:
    """Hash of everything the prepared shards depend on (not the mixture weights)."""
    data, sft = spec.data, _is_sft(spec)
    sources = []
    for s in data.sources:
        files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source_files(s.path, s.glob)]
        sources.append({"path": s.path, "format": s.format, "field": _field(s, sft), "glob": s.glob, "files": files})
    tok = data.tokenizer
    tok_file = tokenizer_source(spec)
    key = {"version": FORMAT_VERSION, "sources": sources, "sft": sft, "val_fraction": data.val_fraction,
           "max_bytes": data.max_bytes, "on_bad_record": data.on_bad_record,
           "tokenizer": {"path": str(tok_file) if tok_file else None,
                         "vocab_size": tok.vocab_size or spec.model.vocab_size,
                         "stat": [tok_file.stat().st_size, tok_file.stat().st_mtime_ns] if tok_file and tok_file.exists() else None,
                         "chat_template": spec_chat_template(spec) if sft else None}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tokenizer_source(spec) -> Path | None:
    """The tokenizer.json the data is tokenized with: data.tokenizer.path, else that of the model
    folder the run starts from (train.init_from); None: one is trained on the sources."""
    if spec.data.tokenizer.path:
        return Path(spec.data.tokenizer.path)
    if spec.train.init_from:
        return init_folder(spec.train.init_from) / "tokenizer.json"
    return None


def spec_chat_template(spec) -> str:
    """The chat template conversations are rendered with (folders.py: run_chat_template)."""
    return run_chat_template(spec.data.tokenizer.chat_template, spec.train.init_from)


def prepared_dir(spec) -> Path:
    """Where `prepare(spec)` puts (or found) the shards: relative cache dirs are relative to the cwd."""
    return Path(spec.data.cache_dir).resolve() / fingerprint(spec)[:16]


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{directory}: no prepared data here (run `llmc data prepare SPEC`)")
    return json.loads(path.read_text())


def _documents(spec, source, bad: BadRecords):
    sft = _is_sft(spec)
    return iter_documents(source.path, source.format, _field(source, sft), source.glob, sft=sft,
                          bad=bad, max_bytes=spec.data.max_bytes)


def _tokenizer_texts(spec, template: ChatTemplate):
    for source in spec.data.sources:
        for doc in _documents(spec, source, BadRecords(spec.data.on_bad_record)):
            yield doc.text if doc.text is not None else template.render_text(doc.messages)


# ------------------------------------------------------------------ tokenizing in worker processes
_worker: dict = {}


def _init_worker(tokenizer_json: str, chat_template: str) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # the processes are the parallelism
    from tokenizers import Tokenizer
    _worker["tok"] = Tokenizer.from_str(tokenizer_json)
    _worker["prefix"] = text_prefix(_worker["tok"])  # each document begins as the tokenizer begins a text
    _worker["template"] = ChatTemplate(chat_template)


def _worker_pool(ctx, tokenizer_json: str, chat_template: str):
    """The tokenizing processes, started with Ctrl-C ignored (an ignored signal stays ignored in a
    spawned Python): the parent alone is interrupted, and leaving the pool's `with` ends them."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        return ctx.Pool(WORKERS, _init_worker, (tokenizer_json, chat_template))
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _encode(batch: list[tuple[str | None, list | None]]) -> list[tuple[list[int], list[int] | None]]:
    tok, template = _worker["tok"], _worker["template"]
    out: list = [None] * len(batch)
    texts = [(i, text) for i, (text, _) in enumerate(batch) if text is not None]
    for (i, _), enc in zip(texts, tok.encode_batch([t for _, t in texts], add_special_tokens=False)):
        out[i] = (_worker["prefix"] + enc.ids, None)
    for i, (_, messages) in enumerate(batch):
        if messages is not None:
            out[i] = render_chat(messages, tok, template, _worker["prefix"])
    return out


def _batches(docs, hasher, progress, task):
    batch = []
    for doc in docs:
        hasher.update((doc.text if doc.text is not None else json.dumps(doc.messages)).encode("utf-8"))
        batch.append((doc.text, doc.messages))
        if progress is not None:
            progress.advance(task, doc.nbytes)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _source_bytes(spec, source) -> int:
    total = sum(f.stat().st_size for f in source_files(source.path, source.glob))
    return min(total, spec.data.max_bytes) if spec.data.max_bytes else total


def _write_prepared(spec, tmp: Path, fp: str, console: Console) -> None:
    """The tokenizer, the shards of every source and the manifest, into the folder `tmp`."""
    data, sft = spec.data, _is_sft(spec)
    chat_template = spec_chat_template(spec)
    template = ChatTemplate(chat_template)

    if (source := tokenizer_source(spec)) is not None:
        tok = load_tokenizer(source)
        where = str(source)
    else:
        vocab = data.tokenizer.vocab_size or spec.model.vocab_size
        with console.status(f"training a byte-level BPE tokenizer ({counted(vocab, 'token')})"):
            tok = train_tokenizer(_tokenizer_texts(spec, template), vocab)
        where = "data.tokenizer.vocab_size"
    check_vocab(tok, spec.model.vocab_size, where)
    tok.save(str(tmp / "tokenizer.json"))
    special, unk = special_ids(tok), unknown_token(tok)
    dtype = token_dtype(tok.get_vocab_size(with_added_tokens=True))
    every = max(2, round(1 / data.val_fraction)) if data.val_fraction > 0 else 0

    manifest = {"version": FORMAT_VERSION, "fingerprint": fp, "tokenizer": "tokenizer.json", "special": special,
                "vocab_size": tok.get_vocab_size(with_added_tokens=True), "dtype": dtype.name, "sft": sft,
                "sources": []}
    ctx = multiprocessing.get_context("spawn")  # no fork after tokenizers/torch started threads
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()]
    with _worker_pool(ctx, tok.to_str(), chat_template) as pool, \
            Progress(*columns, console=console, transient=True) as progress:
        for i, source in enumerate(data.sources):
            task = progress.add_task(f"tokenizing {source.path}", total=_source_bytes(spec, source))
            bad, hasher = BadRecords(data.on_bad_record), hashlib.sha256()
            writers = {split: ShardWriter(tmp / f"source{i}-{split}", dtype, special["eos"], sft)
                       for split in ("train", "val")}
            n_docs = n_tokens = n_unknown = 0
            for encoded in pool.imap(_encode, _batches(_documents(spec, source, bad), hasher, progress, task)):
                for ids, mask in encoded:
                    if not ids or (mask is not None and not any(mask)):
                        continue
                    split = "val" if every and n_docs % every == every - 1 else "train"
                    writers[split].add(ids, mask)
                    n_docs += 1
                    n_tokens += len(ids)
                    n_unknown += ids.count(unk[1]) if unk else 0
            train, val = writers["train"].close(), writers["val"].close()
            if n_docs == 0:
                raise DataError(f"{source.path}: no documents with text found"
                                + (f" ({counted(bad.total, 'bad record')} skipped)" if bad.total else ""))
            if unk:
                check_unknown(source.path, n_unknown, n_tokens, unk, where,
                              "a model trained on it learns to predict the unknown token")
            if every and val["documents"] == 0:
                train, val = split_tail(tmp / train["name"], tmp / val["name"], data.val_fraction, dtype, sft)
            manifest["sources"].append({
                "path": source.path, "format": source.format, "field": _field(source, sft), "documents": n_docs,
                "sha256": hasher.hexdigest(), "skipped": dict(bad.counts), "train": train,
                "val": val if every else None})
            if bad.total:
                console.print(f"[yellow]{source.path}: skipped {counted(bad.total, 'bad record')}: {dict(bad.counts)}")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _is_prepared(out: Path, fp: str) -> bool:
    return (out / "manifest.json").is_file() and load_manifest(out).get("fingerprint") == fp


def prepare(spec, *, console: Console | None = None) -> Path:
    """Tokenize the spec's sources into shards (unless already prepared); return the folder."""
    out = prepared_dir(spec)
    fp = fingerprint(spec)
    if _is_prepared(out, fp):
        return out
    console = console or Console(stderr=True, quiet=not sys.stderr.isatty())
    shutil.rmtree(out, ignore_errors=True)  # a damaged one (no manifest, or another fingerprint's)
    try:
        with staged_folder(out) as tmp:  # bad data, Ctrl-C: no half-prepared folder stays behind
            _write_prepared(spec, tmp, fp, console)
    except UserError:
        if not _is_prepared(out, fp):  # (else another process prepared the same data meanwhile: keep theirs)
            raise
    return out


def summary(directory: Path) -> str:
    m = load_manifest(directory)
    lines = [f"prepared data: {directory}  (vocabulary {m['vocab_size']}, {m['dtype']})"]
    for s in m["sources"]:
        val = s["val"]["tokens"] if s["val"] else 0
        skipped = f", skipped {counted(sum(s['skipped'].values()), 'bad record')}" if s["skipped"] else ""
        lines.append(f"  {s['path']}: {counted(s['documents'], 'document')}, "
                     f"{counted(s['train']['tokens'], 'train token')}, {counted(val, 'val token')}{skipped}")
    return "\n".join(lines)


def main(args) -> int:
    """`llmc data prepare SPEC [--set ...]`."""
    from ...compiler.spec import load_spec
    spec = load_spec(args.spec, args.overrides)
    directory = prepare(spec)
    print(summary(directory))
    return 0
