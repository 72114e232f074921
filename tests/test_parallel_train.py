"""`llmc train SPEC --nproc N --set parallel.X=N` runs the parallel layouts end to end through the
training loop: same per-step losses as one process (same data, same init), expert load in the
metrics, and the run report's measured per-rank model-state bytes equal to the plan's (each rank
its own pipeline stage's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.vocab_size=512", "model.max_seq_len=64", "train.seq_len=32", "data.max_bytes=300000",
         "train.max_steps=2", "train.eval_batches=1", "train.global_batch_size=8", "train.micro_batch_size=2",
         "train.precision=fp32"]

pytestmark = pytest.mark.timeout(900)


def llmc_train(tmp_path: Path, out: str, nproc: int, *sets: str, resume: bool = False, spec: str = "tiny_moe",
               env: dict | None = None):
    cmd = [sys.executable, "-m", "llmc.compiler.cli", "train", str(REPO / "specs" / f"{spec}.toml"),
           "--out", str(tmp_path / out), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    if resume:
        cmd.append("--resume")
    for s in SMALL + list(sets):
        cmd += ["--set", s]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    done = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run = tmp_path / out
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return metrics, json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    return tmp, llmc_train(tmp, "one", 1)[0]


@pytest.mark.parametrize("name, nproc, sets, exact_states", [
    ("ep2_fsdp", 2, ["parallel.dp=2", "parallel.ep=2", "parallel.zero=3"], True),
    # experts FSDP2-sharded over edp = 2. One eval batch of 2 samples leaves ranks 0 and 2 without a
    # sample: they evaluate an all-ignored window so that the forward's collectives still meet
    ("edp2_fsdp", 4, ["parallel.dp=4", "parallel.ep=2", "parallel.zero=3"], True),
    ("tp2", 2, ["parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true"], False),
    # the last stage's embedding copy (MTP) is planned; validating after step 1 too checks that the
    # schedule's forward-only pass leaves step 2 unchanged
    ("pp2", 2, ["parallel.dp=1", "parallel.pp=2", "train.eval_every=1"], True),
    # two virtual stages per rank (4 stages of one layer, looped: rank 0 holds stages 0 and 2): the
    # loop trains their union; the plan's per-rank bytes count both of a rank's stages
    ("pp2_interleaved", 2, ["parallel.dp=1", "parallel.pp=2", 'parallel.pp_schedule="interleaved"',
                            "parallel.pp_virtual_stages=2"], True),
])
def test_llmc_train_runs_layout(name, nproc, sets, exact_states, one_process):
    tmp, reference = one_process
    metrics, report = llmc_train(tmp, name, nproc, *sets)
    assert [m["step"] for m in metrics] == [1, 2]
    for got, want in zip(metrics, reference):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got["loss"], want["loss"])
        assert len(got["expert_load"]) == len(want["expert_load"])
        if "val_loss" in want:  # the same validation set, however it is split over the ranks (or stages)
            assert abs(got["val_loss"] - want["val_loss"]) <= 1e-5 * want["val_loss"], (got, want)
    assert "val_loss" in metrics[-1] and report["validation"]["val_loss"] == metrics[-1]["val_loss"]
    assert (tmp / name / "model" / "model.safetensors").is_file()  # the whole model, gathered from shards
    states = report["model_states"]
    assert len(states["per_rank"]) == nproc
    most_loaded = {k: max(r[k] for r in states["per_rank"]) for k in ("weights", "gradients", "optimizer")}
    if exact_states:
        assert most_loaded == states["plan"]
        plan = json.loads((tmp / name / "plan.json").read_text())
        planned = plan["memory"]["train_stages"]
        per_stage = plan["layout"]["dp"] * plan["layout"]["tp"]   # ranks are laid out (pp, dp, tp)
        for rank, measured in enumerate(states["per_rank"]):
            want = {k: planned[rank // per_stage][k] for k in measured}
            assert measured == want == states["plan_per_rank"][rank], (rank, measured, want)
    else:  # TP keeps norms, MoE layers and MLA's down-projections replicated, the plan divides whole blocks
        assert all(most_loaded[k] >= states["plan"][k] for k in most_loaded)


INTERLEAVED = ["parallel.dp=1", "parallel.pp=2", 'parallel.pp_schedule="interleaved"', "parallel.pp_virtual_stages=2"]


@pytest.mark.parametrize("first, then", [((2, INTERLEAVED), (1, [])), ((1, []), (2, INTERLEAVED))],
                         ids=["interleaved-to-one", "one-to-interleaved"])
def test_interleaved_checkpoint_resumes_across_layouts(first, then, one_process):
    """The union of a rank's virtual stages saves and loads under the model's own names: step 1
    under one layout, resumed for step 2 under the other, gives the one-process step 2."""
    tmp, reference = one_process
    name = f"resume_{first[0]}_to_{then[0]}"
    llmc_train(tmp, name, first[0], *first[1], "train.max_steps=1")
    metrics, _ = llmc_train(tmp, name, then[0], *then[1], resume=True)
    assert [m["step"] for m in metrics] == [1, 2]
    got, want = metrics[1], reference[1]
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got["loss"], want["loss"])
    assert abs(got["val_loss"] - want["val_loss"]) <= 1e-5 * want["val_loss"], (got, want)


# A dense model: a bf16 router's near-ties would let last-bit differences pick other experts and
# swamp the comparison. MTP keeps the last stage's embedding copy in play; init_std 0.1 makes the
# logits large enough that bf16 rounding moves the loss well past the tolerance.
BF16_MODEL = ["model.d_model=64", "model.ffn_hidden=176", "model.mtp.depth=1", "model.init_std=0.1",
              "train.eval_every=1"]
BF16_TOLERANCE = 1e-6  # relative


def test_pipeline_trains_in_bf16_like_one_process(tmp_path):
    """train.precision = "bf16" with pp = 2 and dp = 1 (no FSDP param_dtype to carry it): the stages
    compute under the loop's autocast, so the per-step losses and val_loss are the one-process bf16
    run's. Measured (train.seed 0, the one run here, and 1-2): pp vs one process in bf16 differ by <= 7e-8 relative in the loss
    and not at all in val_loss; one process in fp32 (what the pipeline computed before) misses bf16
    by >= 2.7e-5 in every step's loss and 9e-5 in step 1's val_loss (step 2's can happen to agree)."""
    fp32, _ = llmc_train(tmp_path, "one_fp32", 1, *BF16_MODEL, spec="tiny")
    bf16, _ = llmc_train(tmp_path, "one_bf16", 1, *BF16_MODEL, "train.precision=bf16", spec="tiny")
    # DETAIL makes each PipelineStage check the activations it sends and receives against the
    # static shapes and dtypes it was built with (fp32 here: the residual stream under autocast)
    pp, _ = llmc_train(tmp_path, "pp2_bf16", 2, *BF16_MODEL, "train.precision=bf16", "parallel.dp=1",
                       "parallel.pp=2", spec="tiny", env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"})
    assert [m["step"] for m in pp] == [m["step"] for m in bf16] == [1, 2]

    def rel(a, b):
        return abs(a - b) / abs(b)

    # the comparison can tell the precisions apart: an fp32 pipeline equals the fp32 run to ~1e-7
    assert all(rel(f["loss"], b["loss"]) > 10 * BF16_TOLERANCE for f, b in zip(fp32, bf16)), (fp32, bf16)
    assert max(rel(f["val_loss"], b["val_loss"]) for f, b in zip(fp32, bf16)) > 10 * BF16_TOLERANCE
    for got, want in zip(pp, bf16):
        assert rel(got["loss"], want["loss"]) <= BF16_TOLERANCE, (got, want)
        assert rel(got["mtp_loss"], want["mtp_loss"]) <= BF16_TOLERANCE, (got, want)
        assert rel(got["val_loss"], want["val_loss"]) <= BF16_TOLERANCE, (got, want)


def test_pipeline_scales_the_fp16_loss_like_one_process(tmp_path):
    """train.precision = "fp16" with pp = 2: backward through the stages starts from the
    GradScaler's scaled loss, as loss.backward() does elsewhere, so unscale_ recovers the true
    gradients. Without it they came out divided by the scale (65536): the step-1 gradient norm,
    computed after unscale_, tells the two apart by orders of magnitude, and step 2's loss follows."""
    one, _ = llmc_train(tmp_path, "one_fp16", 1, *BF16_MODEL, "train.precision=fp16", spec="tiny")
    pp, _ = llmc_train(tmp_path, "pp2_fp16", 2, *BF16_MODEL, "train.precision=fp16", "parallel.dp=1",
                       "parallel.pp=2", spec="tiny")
    assert [m["step"] for m in pp] == [m["step"] for m in one] == [1, 2]
    for got, want in zip(pp, one):
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-3 * want["grad_norm"], (got, want)
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got, want)


def test_pipeline_weighs_sft_micro_batches_by_their_targets_like_one_process(tmp_path):
    """SFT masks all but the assistant's tokens, so micro-batches hold unequal numbers of targets.
    The loop without pipelining weighs each micro-batch's loss by its share of the step's targets
    (the mean over every target token of the batch); the pipeline's stages must do the same, or
    a pipelined SFT run follows another gradient (the per-micro-batch mean) from step 1 on."""
    import random
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat log red blue quick slow one two three".split()
    with (tmp_path / "chat.jsonl").open("w") as f:
        for _ in range(200):   # short prompts, answers of 1 to 30 words: targets vary per window
            chat = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))},
                    {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))}]
            f.write(json.dumps({"messages": chat}) + "\n")
    sft = ["train.objective=sft", f'data.sources=[{{ path = "{tmp_path / "chat.jsonl"}", format = "jsonl" }}]',
           "data.val_fraction=0.1", "model.vocab_size=300", "model.mtp.depth=0", "train.eval_every=2"]
    one, _ = llmc_train(tmp_path, "one_sft", 1, *sft, spec="tiny")
    pp, _ = llmc_train(tmp_path, "pp2_sft", 2, *sft, "parallel.dp=1", "parallel.pp=2", spec="tiny")
    assert [m["step"] for m in pp] == [m["step"] for m in one] == [1, 2]
    for got, want in zip(pp, one):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-4 * want["grad_norm"], (got, want)
    assert abs(pp[-1]["val_loss"] - one[-1]["val_loss"]) <= 1e-5 * one[-1]["val_loss"]
