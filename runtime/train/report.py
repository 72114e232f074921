"""The run report: measured throughput, step time and peak memory beside the plan's predictions.

Written by rank 0 as RUN_DIR/report.json and RUN_DIR/report.md at the end of a run. `steps`,
`tokens` and `positions` are the run's (a resumed run's counted from step 0), `measured` what this
process ran, `init_from` the model folder its weights started from (null: a fresh
initialisation). `tokens` and `tokens_per_s` count the input tokens that are not padding (the
last window of a shard is padded); `positions` and `padded_tokens_per_s` every position computed,
global batch x seq_len a step, which MFU counts the FLOPs of.
Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the peak resident set size of the
process on a CPU.
FLOPs per token and the device peak come from the plan when it states them, else from the estimate
6 x (non-embedding active parameters) + 12 x layers x heads x head_dim x seq_len (forward + backward).
"""

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jinja2
import torch

from .metrics import read_metrics


def _render_markdown(**values) -> str:
    """report.md through templates/run_report.md.j2."""
    from importlib import resources
    source = resources.files("llmc.templates").joinpath("run_report.md.j2").read_text(encoding="utf-8")
    return jinja2.Template(source, keep_trailing_newline=True).render(**values)


class RunClock:
    """Step timings (synchronised with the device) and each timed step's input tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.input_tokens: list[int] = []
        self._t0 = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self, input_tokens: int) -> float:
        """The step's time; `input_tokens`: the non-padding input tokens of its global batch."""
        self._sync()
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        self.input_tokens.append(input_tokens)
        return dt


def flops_per_token(plan: dict) -> float:
    """Training FLOPs per token (forward + backward)."""
    stated = (plan.get("flops") or {}).get("train_per_token")
    if stated:
        return float(stated)
    spec, params = plan["spec"], plan["params"]
    m, seq = spec["model"], spec["train"]["seq_len"]
    non_embedding = params["active"] - params["embedding"]
    if m.get("tie_embeddings"):
        non_embedding += params["embedding"]  # the tied head is a matmul
    head_dim = m.get("head_dim") or m["d_model"] // m["n_heads"]
    return 6.0 * non_embedding + 12.0 * m["n_layers"] * m["n_heads"] * head_dim * seq


def peak_flops(plan: dict) -> float:
    """Dense peak FLOP/s of one device: the spec's override, else the accelerator catalog's."""
    hw = plan["spec"]["hardware"]
    if (plan.get("flops") or {}).get("peak_tflops"):
        return plan["flops"]["peak_tflops"] * 1e12
    if hw.get("peak_tflops"):
        return hw["peak_tflops"] * 1e12
    from ...compiler.plan.hardware import lookup
    return lookup(hw["accelerator"]).peak_tflops(plan["spec"]["train"]["precision"]) * 1e12


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS of the process"


def _predictions(plan: dict, world_size: int, tokens_per_step: int, fpt: float) -> dict:
    """What the plan predicts (its layout's step time and tokens/s, its memory peak per device)."""
    layout, flops = plan.get("layout") or {}, plan.get("flops") or {}
    mfu = flops.get("mfu", plan["spec"]["hardware"].get("mfu", 0.4))
    tps = layout.get("tokens_per_s") or flops.get("tokens_per_s") or mfu * peak_flops(plan) * world_size / fpt
    step = layout.get("step_time_s") or tokens_per_step / tps
    per_device = ((plan.get("memory") or {}).get("train") or {}).get("peak")
    return {"tokens_per_s": f"{tps:,.0f}", "step_time_s": f"{step:.3f}", "mfu": f"{mfu:.2f}",
            "memory_gib": f"{per_device / 2**30:.3f}" if isinstance(per_device, (int, float)) else "-",
            "tokens_per_s_value": tps, "step_time_value": step, "mfu_value": mfu,
            "memory_bytes": per_device if isinstance(per_device, (int, float)) else None}


def data_tokens(run_dir: Path, step: int, positions_per_step: int) -> int:
    """The data's tokens the run trained on in steps 1..step, padding excluded: the sum of
    metrics.jsonl's `input_tokens` (the file tells the story of the final weights: a resumed run
    cut it back to its checkpoint); a step with no such record counts its positions."""
    counted = {r["step"]: r["input_tokens"] for r in read_metrics(run_dir) if "input_tokens" in r and 0 < r["step"] <= step}
    return sum(counted.values()) + (step - len(counted)) * positions_per_step


def write_report(run_dir: Path, plan: dict, clock: RunClock, val: dict | None, env, last_checkpoint,
                 step: int) -> dict:
    """report.json + report.md; returns the report. `step`: the step the run has reached (its
    checkpoint's, for a resumed run), of which this process timed `clock.times`."""
    spec = plan["spec"]
    tokens_per_step = spec["train"]["global_batch_size"] * spec["train"]["seq_len"]  # positions, padding included
    warm_up = 2 if len(clock.times) > 4 else 0  # the first steps include warm-up
    timed, timed_tokens = clock.times[warm_up:], clock.input_tokens[warm_up:]
    fpt = flops_per_token(plan)
    mem, kind = peak_memory(env.device)
    # a resumed run with no steps left measured no speed: None, not 0 tokens/s
    step_time = statistics.median(timed) if timed else None
    padded_tps = tokens_per_step / step_time if timed else None
    tps = padded_tps * sum(timed_tokens) / (len(timed) * tokens_per_step) if timed else None
    measured = {"steps": len(clock.times), "measured_steps": len(timed), "step_time_s": step_time,
                "tokens_per_s": tps, "padded_tokens_per_s": padded_tps,
                "mfu": fpt * padded_tps / (peak_flops(plan) * env.world_size) if timed else None,
                "peak_memory_bytes": mem, "peak_memory_kind": kind}
    predicted = _predictions(plan, env.world_size, tokens_per_step, fpt)
    report = {"name": spec["job"]["name"], "world_size": env.world_size, "plan_hash": plan.get("spec_hash"),
              "init_from": spec["train"].get("init_from"),
              "steps": step, "tokens": data_tokens(run_dir, step, tokens_per_step),
              "positions": step * tokens_per_step, "flops_per_token": fpt, "measured": measured,
              "plan": {"tokens_per_s": predicted["tokens_per_s_value"], "step_time_s": predicted["step_time_value"],
                       "mfu": predicted["mfu_value"], "memory_bytes_per_device": predicted["memory_bytes"]},
              "validation": val, "last_checkpoint_step": last_checkpoint}
    (Path(run_dir) / "report.json").write_text(json.dumps(report, indent=2))
    (Path(run_dir) / "report.md").write_text(
        _render_markdown(r=report, m=measured, p=predicted, world_size=env.world_size, val=val))
    return report
