"""The `llmc` command: a table of verbs, each a plain function imported only when it runs.

Runtime verbs (train, eval, generate, ...) live in `llmc.runtime` and import torch lazily, so
`llmc lint` and `llmc plan` work in an environment without torch.
"""

import argparse
import importlib
import os
import sys

from .errors import UserError
from .spec import SpecError


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a spec file (TOML)")
    _set_arg(p)


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set train.seq_len=8192 (repeatable)")


def _lint(p):
    p.add_argument("paths", nargs="+", help="spec files or folders (searched for *.toml)")
    p.add_argument("--format", choices=["text", "json", "github"], default="text",
                   help="text for people, json for tools, github for workflow annotations")
    _set_arg(p)


def _schema(p):
    p.add_argument("-o", "--output", help="write to this file instead of standard output")


def _plan(p):
    _spec_args(p)
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table", help="report format")
    p.add_argument("--json", action="store_const", const="json", dest="format", help="same as --format json")
    p.add_argument("--formula", action="store_true", help="print the closed-form parameter counts")


def _hardware(p):
    del p  # no options


def _import_hf(p):
    p.add_argument("source", help="a Hugging Face config.json, or a folder with config.json (and weights)")
    p.add_argument("-o", "--output", help="the spec to write (config only) or a folder (with weights)")


def _export_hf(p):
    p.add_argument("checkpoint", help="an llmc checkpoint folder")
    p.add_argument("-o", "--output", required=True, help="folder to write the Hugging Face model into")


def _compile(p):
    _spec_args(p)
    p.add_argument("-o", "--output", required=True, help="folder for plan.json, the AppDef, scheduler requests, job card")


def _run(p):
    _spec_args(p)
    p.add_argument("--scheduler", choices=["local", "slurm", "kubernetes"], help="override job.scheduler")
    p.add_argument("--dryrun", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="slurm, kubernetes: return after submitting (then `llmc logs -f HANDLE`); local: the job "
                   "runs inside this process, which still waits until it ends, printing state changes, not logs")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest complete checkpoint")


def _handle(p):
    p.add_argument("handle", help="an app handle printed by `llmc run` (scheduler://session/app-id)")


def _logs(p):
    _handle(p)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def _list(p):
    p.add_argument("--scheduler", choices=["local", "slurm", "kubernetes"], default="local")


def _data_prepare(p):
    _spec_args(p)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def _train(p):
    _spec_args(p)
    p.add_argument("--out", help="run directory (default: job.out_dir/job.name)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--nproc", type=_positive_int,
                   help="processes (default: the plan's world size); >1 uses torchrun")


def _eval(p):
    p.add_argument("checkpoint", help="a run directory or checkpoint folder")
    p.add_argument("--text-file", required=True, help="UTF-8 text to evaluate on")
    p.add_argument("--stride", type=_positive_int,
                   help="tokens between the starts of context windows (default: the context; less gives "
                        "each prediction more history, for more forwards)")
    p.add_argument("--json", action="store_true", help="print {loss, perplexity, tokens}")


DTYPE_HELP = "compute dtype (default: as stored; fp32 for fp16 weights and for a quantized checkpoint)"


def _generate(p):
    p.add_argument("checkpoint", help="a run directory or checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft", help="a smaller checkpoint for speculative decoding")
    p.add_argument("--json", action="store_true", help="print {text, tokens, tokens_per_s} per prompt")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help=DTYPE_HELP)


def _chat(p):
    p.add_argument("checkpoint", help="a run directory or checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--dtype", choices=["fp32", "bf16"], help=DTYPE_HELP)


def _quantize(p):
    p.add_argument("checkpoint", help="a checkpoint folder")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asymmetric", action="store_true", help="per-group zero points")
    p.add_argument("-o", "--output", required=True)


# name -> (help, arguments, "module:function"). Nested verbs are "group verb".
VERBS = {
    "lint": ("check specs and report every error (exit 1 if any)", _lint, "llmc.compiler.lint:main"),
    "schema": ("print the JSON Schema of the spec language", _schema, "llmc.compiler.lint:schema_main"),
    "plan": ("resolve a spec: parameters, FLOPs, memory per device, parallel layout", _plan,
             "llmc.compiler.report:main"),
    "hardware": ("list the accelerator catalog", _hardware, "llmc.compiler.report:hardware_main"),
    "import hf": ("turn a Hugging Face config.json (and weights) into an llmc spec (and checkpoint)",
                  _import_hf, "llmc.compiler.hf:import_main"),
    "export hf": ("write an llmc checkpoint as a Hugging Face model", _export_hf,
                  "llmc.runtime.hf_weights:export_main"),
    "compile": ("write plan.json, the TorchX AppDef and scheduler requests for a spec", _compile,
                "llmc.compiler.job:compile_main"),
    "run": ("plan, compile and submit a job through TorchX", _run, "llmc.compiler.job:run_main"),
    "status": ("status of a submitted job", _handle, "llmc.compiler.job:status_main"),
    "logs": ("logs of a submitted job", _logs, "llmc.compiler.job:logs_main"),
    "cancel": ("cancel a submitted job", _handle, "llmc.compiler.job:cancel_main"),
    "list": ("list jobs of a scheduler", _list, "llmc.compiler.job:list_main"),
    "data prepare": ("tokenize a spec's sources into token shards", _data_prepare,
                     "llmc.runtime.data.prepare:main"),
    "train": ("train a spec here (torchrun for several processes)", _train, "llmc.runtime.train.cli:main"),
    "eval": ("loss and perplexity of a checkpoint on a text", _eval, "llmc.runtime.evaluate:main"),
    "generate": ("generate text from a checkpoint", _generate, "llmc.runtime.infer.cli:generate_main"),
    "chat": ("chat with a checkpoint", _chat, "llmc.runtime.infer.cli:chat_main"),
    "quantize": ("write an int8/int4 weight-only copy of a checkpoint", _quantize,
                 "llmc.runtime.infer.cli:quantize_main"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmc",
        description="llmc compiles one TOML spec of a model and a run into exact parameter counts, "
                    "FLOPs, memory per device, a parallel layout, and a TorchX job.",
        epilog="Run `llmc VERB --help` for a verb's options.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help_text, arguments, target) in VERBS.items():
        if " " in name:
            group, verb = name.split(" ", 1)
            if group not in groups:
                gp = verbs.add_parser(group, help=f"{group} verbs")
                groups[group] = gp.add_subparsers(dest="subverb", metavar="VERB", required=True)
            sub = groups[group].add_parser(verb, help=help_text, description=help_text)
        else:
            sub = verbs.add_parser(name, help=help_text, description=help_text)
        arguments(sub)
        sub.set_defaults(target=target)
    return parser


def _print_spec_error(error: SpecError) -> None:
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    n = len(error.problems)
    print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)


def _check_models(args) -> None:
    """The models a verb reads (its checkpoint, a draft model), refused at once when no model is
    there: before the runtime's import of torch, which takes seconds."""
    from llmc.runtime.folders import check_model_source  # (no torch)
    for name in ("checkpoint", "draft"):
        if getattr(args, name, None) is not None:
            check_model_source(getattr(args, name))


def _import_verb(module_name: str, verb: str):
    """The module of a verb; None, said on stderr, when it needs the runtime and that is not installed."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("torch", "tokenizers", "safetensors", "numpy"):
            print(f"error: `llmc {verb}` needs the runtime ({e.name} is not installed): "
                  "pip install 'llmc[runtime]'", file=sys.stderr)
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function = args.target.split(":")
    try:
        _check_models(args)
        module = _import_verb(module_name, args.verb)
        return 1 if module is None else int(getattr(module, function)(args) or 0)
    except SpecError as e:
        _print_spec_error(e)
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmc plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 0
    except OSError as e:  # a folder that cannot be made, a file that cannot be written, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
