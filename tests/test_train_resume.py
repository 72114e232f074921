"""A run killed with SIGKILL and resumed gives exactly the per-step losses of an uninterrupted run."""

import json
import signal
import time

import pytest
from safetensors.torch import load_file

from train_helpers import llmc_train, metrics, train_args

RUN = ["train.max_steps=14", "train.checkpoint_every=3", "train.eval_every=7", "train.keep_checkpoints=2",
       "train.global_batch_size=4", "train.micro_batch_size=2"]


@pytest.mark.timeout(600)
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    done = llmc_train(tmp_path, "straight", *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = metrics(tmp_path / "straight")
    assert [m["step"] for m in straight] == list(range(1, 15))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time"):
        assert all(key in m for m in straight), key
    assert "val_loss" in straight[6] and "val_perplexity" in straight[13]

    proc = llmc_train(tmp_path, "killed", *RUN, popen=True)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 8:
            proc.send_signal(signal.SIGKILL)  # between checkpoints 6 and 9
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "report.json").exists()
    completed = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("step-*"))
    assert completed and all((tmp_path / "killed" / "checkpoints" / c / "meta.json").is_file() for c in completed)

    resumed = llmc_train(tmp_path, "killed", *RUN, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = metrics(tmp_path / "killed")
    assert [m["step"] for m in after] == list(range(1, 15))
    assert [m["loss"] for m in after] == [m["loss"] for m in straight]
    assert [m.get("val_loss") for m in after] == [m.get("val_loss") for m in straight]
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("step-*")) == \
        ["step-00000012", "step-00000014"]  # keep_checkpoints = 2

    # the run directory holds what the contract says
    run = tmp_path / "straight"
    for name in ("plan.json", "spec.toml", "report.json", "report.md", "model/plan.json", "model/tokenizer.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["measured"]["tokens_per_s"] > 0 and report["measured"]["peak_memory_bytes"] > 0
    assert report["plan"]["tokens_per_s"] > 0

    # resuming under a different architecture is refused, naming the difference
    refused = llmc_train(tmp_path, "straight", *RUN, "model.d_model=96", "model.n_heads=4", resume=True)
    assert refused.returncode == 1
    assert "model.d_model: 64 -> 96" in refused.stderr and "Traceback" not in refused.stderr
    # and starting over into a run directory with checkpoints needs --resume or another --out
    again = llmc_train(tmp_path, "straight", *RUN)
    assert again.returncode == 1 and "--resume" in again.stderr


def test_checkpoint_carries_the_fp16_loss_scale(tmp_path):
    """A resumed fp16 run continues from the loss scale it had reached (after overflows halved it),
    not from 2^16 again, which would skip steps the uninterrupted run took."""
    import torch

    from llmc.runtime.train.checkpoint import load_checkpoint, save_checkpoint
    from llmc.runtime.train.distributed import DistEnv

    def parts():
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters())
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), torch.amp.GradScaler("cpu")

    model, opt, sched, scaler = parts()
    scaler.scale(torch.ones(()))   # the scaler starts at 2^16 ...
    scaler.update(new_scale=1024.0)  # ... and overflows brought it down
    path = save_checkpoint(tmp_path, 5, model, opt, sched, {}, {"spec_hash": "h", "spec": {}}, DistEnv(), keep=1,
                           scaler=scaler)
    model, opt, sched, fresh = parts()
    step, _ = load_checkpoint(path, model, opt, sched, DistEnv(), fresh)
    assert step == 5 and fresh.get_scale() == 1024.0


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    """--resume of a run that has trained all its steps has nothing to do: it says so and leaves
    plan.json, report.json and the model as they were (it rewrote them, the report with 0 steps and
    a NaN step time); a budget that ends before the checkpoint's step is refused; more steps train on."""
    import hashlib

    run = tmp_path / "run"
    first = llmc_train(tmp_path, "run", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]

    def digests():
        return {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
                for name in ("plan.json", "spec.toml", "report.json", "report.md", "metrics.jsonl",
                             "model/model.safetensors", "model/plan.json")}
    before = digests()

    again = llmc_train(tmp_path, "run", "train.max_steps=2", resume=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" in again.stderr
    assert digests() == before

    fewer = llmc_train(tmp_path, "run", "train.max_steps=1", resume=True)
    assert fewer.returncode == 1 and "Traceback" not in fewer.stderr
    assert fewer.stderr.count("error:") == 1 and "step 2" in fewer.stderr
    assert digests() == before

    more = llmc_train(tmp_path, "run", "train.max_steps=3", resume=True)
    assert more.returncode == 0, more.stderr[-3000:]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 3 and report["measured"]["steps"] == 1  # the run's steps, this process's


class Killed(BaseException):
    """The process dying between its last checkpoint and the final model save."""


def test_resume_after_a_kill_before_the_final_save_saves_and_reports_the_true_steps(tmp_path, monkeypatch):
    """A run killed after its last checkpoint, before the final model and report: --resume saves the
    model and reports the checkpoint's steps, tokens and validation (it reported 0 steps, no validation
    and no checkpoint); and when an earlier session's model and report are there, it does not take
    them for this step's ("nothing to train", with the model of step 2 under a checkpoint of step 3)."""
    from llmc.compiler.cli import main
    from llmc.runtime.train.loop import Trainer

    run, save = tmp_path / "run", Trainer.save_final_model

    def session(steps: int, kill: bool = False) -> int:
        def killed(*args, **kwargs):
            raise Killed
        monkeypatch.setattr(Trainer, "save_final_model", killed if kill else save)
        return main(train_args(tmp_path, "run", f"train.max_steps={steps}", resume=True))

    with pytest.raises(Killed):
        session(2, kill=True)
    assert (run / "checkpoints" / "step-00000002").is_dir()
    assert not (run / "model").exists() and not (run / "report.json").exists()

    assert session(2) == 0
    report = json.loads((run / "report.json").read_text())
    tokens = sum(r["input_tokens"] for r in metrics(run))   # the data's, of the first session's steps
    assert f"Steps: 2 ({tokens:,} tokens, 1,024 positions with padding)" in (run / "report.md").read_text()
    assert (report.get("steps"), report.get("tokens"), report.get("positions"), report["last_checkpoint_step"]) \
        == (2, tokens, 1024, 2)   # positions: global batch 8 x seq_len 64 a step
    assert report["measured"]["steps"] == 0 and report["measured"]["tokens_per_s"] is None
    assert report["validation"]["val_loss"] == pytest.approx(metrics(run)[-1]["val_loss"], rel=1e-6)
    step2 = load_file(str(run / "model" / "model.safetensors"))

    with pytest.raises(Killed):  # the model and report of step 2 stay; the checkpoint is of step 3
        session(3, kill=True)
    assert session(3) == 0
    assert json.loads((run / "report.json").read_text()).get("steps") == 3
    step3 = load_file(str(run / "model" / "model.safetensors"))
    assert any(not (step2[k] == step3[k]).all() for k in step2)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


def test_out_naming_a_file_is_one_error_line_and_keeps_the_file(tmp_path):
    """--out naming an existing file (not a run directory): one error line before any work,
    the file untouched (it prepared the data, then died with FileExistsError's traceback)."""
    (tmp_path / "notes.txt").write_text("mine")
    r = llmc_train(tmp_path, "notes.txt", "train.max_steps=1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr[-2000:]
    assert "notes.txt exists and is not a folder" in r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "cache").exists()
