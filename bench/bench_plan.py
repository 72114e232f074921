"""Benchmark: `llmc plan specs/ds_v32.toml` as a fresh process vs counting the same model with
transformers' DeepSeek-V3.2 built on the meta device (also a fresh process), and a layout search
over 16,384 GPUs. Prints a table with the ratios. Targets: plan < 0.5 s, search < 1 s.

    python bench/bench_plan.py [--repeat 5]

Wall-clock times on a shared machine vary; CPU time (user + system of the child) is printed too.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "specs" / "ds_v32.toml")

REFERENCE = """
import torch
from transformers.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
with torch.device("meta"):
    model = DeepseekV32ForCausalLM(DeepseekV32Config())  # its defaults are DeepSeek-V3.2's shapes
print(sum(p.numel() for p in model.parameters()))
"""


def timed(cmd: list[str], repeat: int) -> tuple[float, float, str]:
    """(median wall s, median CPU s, stdout of the last run) of a fresh process."""
    walls, cpus, out = [], [], ""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        out = run.stdout
    return statistics.median(walls), statistics.median(cpus), out


def search_16k(repeat: int) -> tuple[float, int, str]:
    """Median seconds of a layout search over 16,384 H800s for ds_v32 with tp, pp, ep, zero searched."""
    from llmc.compiler.plan.layout import LayoutSearch
    from llmc.compiler.plan.params import count_params
    from llmc.compiler.spec import load_spec

    spec = load_spec(SPEC, ["hardware.nodes=2048", 'parallel.tp="auto"'])
    params = count_params(spec.model)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        chosen, _, summary, _ = LayoutSearch(spec, params).run()
        times.append(time.perf_counter() - start)
    d = chosen.degrees
    return statistics.median(times), summary.considered, f"dp={d.dp} tp={d.tp} pp={d.pp} ep={d.ep} zero={d.zero}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    llmc = [sys.executable, "-m", "llmc.compiler.cli", "plan", SPEC]
    plan_wall, plan_cpu, _ = timed(llmc, args.repeat)
    json_wall, json_cpu, _ = timed(llmc + ["--json"], args.repeat)
    ref_wall, ref_cpu, ref_out = timed([sys.executable, "-c", REFERENCE], max(1, args.repeat // 2))
    search_s, considered, chosen = search_16k(args.repeat)

    from rich.console import Console
    from rich.table import Table

    t = Table(title="llmc plan vs transformers on the meta device (DeepSeek-V3.2, fresh processes, medians)")
    for col in ("what", "wall s", "CPU s", "target", "faster than reference (wall / CPU)"):
        t.add_column(col, justify="left" if col == "what" else "right")
    t.add_row("llmc plan specs/ds_v32.toml (tables)", f"{plan_wall:.3f}", f"{plan_cpu:.3f}", "< 0.5 s",
              f"{ref_wall / plan_wall:.1f}x / {ref_cpu / plan_cpu:.1f}x")
    t.add_row("llmc plan specs/ds_v32.toml --json", f"{json_wall:.3f}", f"{json_cpu:.3f}", "< 0.5 s",
              f"{ref_wall / json_wall:.1f}x / {ref_cpu / json_cpu:.1f}x")
    t.add_row(f"reference: DeepseekV32ForCausalLM on meta ({int(ref_out or 0):,} params)", f"{ref_wall:.3f}",
              f"{ref_cpu:.3f}", "", "1x / 1x")
    t.add_row(f"layout search, 16,384 GPUs ({considered:,} layouts; chose {chosen})", f"{search_s:.3f}", "",
              "< 1 s", "")
    Console().print(t)
    print("The reference counts only the main model's parameters; llmc also resolves FLOPs, memory and the layout.")


if __name__ == "__main__":
    main()
