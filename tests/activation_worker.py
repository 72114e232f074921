"""One rank of tests/test_plan_activations.py's tensor-parallel case (launched through torchrun):
the bytes this rank's training forward keeps for the backward, and the plan's activations, to
OUT/rank{r}.json. Arguments: MODEL (a key of MODELS) SEQUENCE_PARALLEL (0 or 1) RECOMPUTE OUT."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_plan_activations import kept_for_backward, spec_for  # noqa: E402

from llmc.compiler.plan import build_plan  # noqa: E402
from llmc.runtime.parallel import Layout, build_mesh, init_distributed, parallelize  # noqa: E402


def main():
    name, sp, recompute, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3], Path(sys.argv[4])
    init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    rank = dist.get_rank()
    folder = out / f"spec{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    spec = spec_for(folder, name, "bf16", recompute, tp=dist.get_world_size(), sequence_parallel=sp)
    plan = build_plan(spec)
    pdims = build_mesh(Layout.from_plan(plan.model_dump(mode="json")))
    kept = kept_for_backward(spec, wrap=lambda model: parallelize(model, pdims))
    (out / f"rank{rank}.json").write_text(json.dumps({"kept": kept, "plan": plan.memory.train.activations}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
