"""The folders commands write their results into: `llmc quantize`, `export hf` and `import hf`
(`-o OUT`), and `data prepare` (the cache folder of the prepared data); and a run directory's
complete checkpoints (`checkpoints`), which `llmc run` also checks before it submits a job; and
the model folder a run starts from (`train.init_from`: `check_init_from`), and the plan.json of
a model folder (`read_plan`, `model_spec_from_plan`).

`output_folder` refuses an `-o` that would replace or mix with other files; `staged_folder` writes
through a temporary sibling, so that a command that fails or is killed midway never leaves a
partial folder under the final name (which a re-run would then refuse). No torch here: the data
preparation and its tokenizing workers import this module.
"""

import copy
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmc.compiler.errors import UserError


def output_folder(out, *inputs) -> Path:
    """`out` as the folder a command writes a model into, refused when it is one of the folders the
    command reads (the checkpoint, its run directory): the new files would replace the input; and
    when it already holds files (another model, a run): they would be replaced or mixed with the new."""
    out = Path(out)
    for folder in inputs:
        if out.resolve() == Path(folder).resolve():
            raise UserError(f"-o {out} is the input folder {folder}: writing there would replace what is read; "
                            f"give another output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):  # another model or run: its files would be replaced or mixed in
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise UserError(f"-o {out} is a folder that already holds files ({held}); give a new or empty folder")
    return out


@contextmanager
def staged_folder(out) -> Iterator[Path]:
    """A new folder to write into, beside `out` (`.NAME.tmp-HOST-PID`), that becomes `out` when the block
    ends: renamed to it when `out` is absent, its files moved into `out` when `out` is an empty folder
    (kept, for it may be a mount point or a shell's working directory). When the block raises (or is
    interrupted by Ctrl-C) the folder is removed and `out` is left as it was; a process killed outright
    leaves only the hidden folder, which the next staging of `out` on that host removes. Raises UserError when `out` has been filled by another process."""
    out = Path(out).absolute()  # (`-o .` has no name to put beside)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    given = out.is_dir()
    _remove_abandoned(out, tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write into {out} ({e.strerror or e})") from None
    try:
        yield tmp
        try:
            if given:
                for entry in tmp.iterdir():
                    shutil.move(entry, out / entry.name)  # a rename on one filesystem
            else:
                os.replace(tmp, out)  # one atomic rename; refused if `out` appeared with files in it
        except OSError as e:
            raise UserError(f"{out}: could not put the written files there ({e.strerror or e}); "
                            "they were removed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def _remove_abandoned(out: Path, tmp: Path) -> None:
    """Remove the staging folders of `out` that processes of this host killed outright left behind
    (their process is gone, or has our pid now). Other hosts' are left: they may share the folder."""
    host = socket.gethostname()
    for folder in out.parent.glob(f".{out.name}.tmp-{host}-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if folder == tmp or (pid.isdigit() and not _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def checkpoints(run_dir) -> list[Path]:
    """The complete checkpoints of a run directory (RUN_DIR/checkpoints/step-N), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if is_checkpoint(p))


def refuse_a_used_run_dir(run_dir, elsewhere: str) -> None:
    """Refuse to start a run in a run directory that holds checkpoints (it would train over them);
    `elsewhere`: how to name another run directory."""
    if checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                        f"or {elsewhere} for a new run directory")


def latest_checkpoint(run_dir) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def is_model_folder(path) -> bool:
    """`path` holds a saved model: plan.json and model.safetensors (runtime/model/io.py)."""
    return (Path(path) / "plan.json").is_file() and (Path(path) / "model.safetensors").is_file()


def check_model_source(path) -> None:
    """Refuse a path no model can be read from: neither a model folder nor a training checkpoint,
    nor a run directory holding one of them (its final model DIR/model or a checkpoint). Called
    before torch is imported, so that a mistyped path fails at once; resolve_model_dir
    (runtime/model/io.py) chooses among what is there."""
    path = Path(path)
    if is_model_folder(path) or is_checkpoint(path) or is_model_folder(path / "model") or checkpoints(path):
        return
    if path.name.startswith(".tmp-step-"):
        raise UserError(f"{path} is a checkpoint the run never finished writing; use a complete one "
                        f"({path.parent}/step-*)")
    raise UserError(f"{path} is not an llmc model folder (expected plan.json and model.safetensors "
                    f"in it or in {path / 'model'}, or a training checkpoint's meta.json)")


def is_checkpoint(path) -> bool:
    """`path` is a complete checkpoint folder: RUN_DIR/checkpoints/step-N with its meta.json (an
    unfinished one is written under a temporary name, runtime/train/checkpoint.py)."""
    return Path(path).name.startswith("step-") and (Path(path) / "meta.json").is_file()


def model_spec_from_plan(plan: dict):
    """The ModelSpec of a plan.json document (the runtime never reads TOML)."""
    from pydantic import ValidationError

    from llmc.compiler.spec import ModelSpec  # (the spec language: no torch)
    try:
        return ModelSpec.model_validate(plan["spec"]["model"])
    except (KeyError, TypeError, ValidationError) as e:
        raise UserError(f"plan.json has no valid spec.model table ({str(e).splitlines()[0]})") from None


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


def _given_chat_template(spec: dict) -> str | None:
    """data.tokenizer.chat_template as a spec document gives it (None: absent)."""
    return ((spec.get("data") or {}).get("tokenizer") or {}).get("chat_template")


def run_chat_template(template: str | None, init_from: str | None) -> str:
    """The chat template a run renders conversations with, found as its tokenizer is
    (data/prepare.py: tokenizer_source): data.tokenizer.chat_template, else that of the model
    folder the run starts from (train.init_from: the one `llmc import hf` carried over, or a
    run's), else "chatml"."""
    if template is not None:
        return template
    if init_from is not None:
        try:
            return _given_chat_template(read_plan(init_folder(init_from))["spec"]) or "chatml"
        except (UserError, KeyError, AttributeError):  # (a folder a fresh run refuses: check_init_from says why)
            pass
    return "chatml"


def plan_chat_template(plan: dict) -> str:
    """The chat template of a plan.json document's run (run_chat_template)."""
    spec = plan["spec"]
    return run_chat_template(_given_chat_template(spec), (spec.get("train") or {}).get("init_from"))


def with_chat_template(plan: dict) -> dict:
    """The plan with its run's chat template written out: a run's model folder renders chats as
    the run did, without the folder it started from."""
    plan = copy.deepcopy(plan)
    plan["spec"].setdefault("data", {}).setdefault("tokenizer", {})["chat_template"] = plan_chat_template(plan)
    return plan


def init_folder(path) -> Path:
    """The model folder a run's `train.init_from` names: the folder itself, or a run directory's
    final model (RUN_DIR/model)."""
    path = Path(path)
    return path / "model" if not is_model_folder(path) and is_model_folder(path / "model") else path


def check_init_from(spec) -> None:
    """Refuse a `train.init_from` a run cannot start from: not a model folder, a quantized one, or
    one of another model than `spec.model` (the keys that differ are named). Reads JSON only (no
    torch): `llmc train` and `llmc run` call it before anything is prepared, the trainer on every rank."""
    from llmc.compiler.spec.dump import flatten  # (pydantic: not for the tokenizing workers that import this module)
    if spec.train.init_from is None:
        return
    folder = init_folder(spec.train.init_from)
    where = f"train.init_from: {folder}"
    if not is_model_folder(folder):
        raise UserError(f"{where} is not a model folder (expected plan.json and model.safetensors in it, "
                        "as `llmc import hf` and a finished run's RUN_DIR/model hold)")
    if (folder / "quantization.json").is_file():
        raise UserError(f"{where} holds a quantized model, which cannot be trained: start from the model "
                        "it was quantized from")
    try:
        theirs = model_spec_from_plan(read_plan(folder))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if spec.data.tokenizer.path is None and not (folder / "tokenizer.json").is_file():
        raise UserError(f"{where} has no tokenizer.json: give data.tokenizer.path, the tokenizer its weights "
                        "were trained with")
    theirs, ours = (flatten(m.model_dump(mode="json"), "model.") for m in (theirs, spec.model))
    differ = [key for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
    if differ:
        shown = "; ".join(f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here" for key in differ[:5])
        more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
        raise UserError(f"{where} holds another model than the spec's: {shown}{more}; give [model] the folder's "
                        "(a run's is in its spec.toml; `llmc import hf` of a config.json writes it as a spec)")
