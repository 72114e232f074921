"""One rank of tests/test_plan_activations.py's two-process cases (launched through torchrun):
the most bytes this rank keeps for the backward, and the plan's activations for its stage, to
OUT/rank{r}.json.

    activation_worker.py tp MODEL SEQUENCE_PARALLEL(0|1) RECOMPUTE PRECISION OUT    tp = 2: one forward
    activation_worker.py pp MODEL SCHEDULE VIRTUAL_STAGES MICRO_BATCHES OUT    pp = 2: a schedule step
    activation_worker.py loss DTYPE OUT    the loss of logits split over the vocabulary, against the whole
    activation_worker.py chunked-loss DTYPE WEIGHT_DTYPE OUT    the chunked loss over a head's split rows
    activation_worker.py --batch LISTING    the argument lists of LISTING (JSON), one after another
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_plan_activations import T, MadeAlive, SavedForBackward, kept_for_backward, spec_for  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

from llmc.runtime.model.loss import chunked_cross_entropy, cross_entropy  # noqa: E402

from llmc.compiler.plan import build_plan  # noqa: E402
from llmc.runtime.model import Transformer  # noqa: E402
from llmc.runtime.parallel import Layout, build_mesh, init_distributed, parallelize  # noqa: E402
from llmc.runtime.parallel.run import pipeline_for_plan  # noqa: E402


def tensor_parallel(folder: Path, name: str, sp: str, recompute: str, precision: str) -> tuple[int, object]:
    spec = spec_for(folder, name, precision, recompute, tp=2, sequence_parallel=sp == "1")
    plan = build_plan(spec)
    pdims = build_mesh(Layout.from_plan(plan.model_dump(mode="json")))
    return kept_for_backward(spec, wrap=lambda model: parallelize(model, pdims)), plan.memory.train


def pipeline(folder: Path, name: str, schedule: str, virtual_stages: str, micro_batches: str) -> tuple[int, object]:
    spec = spec_for(folder, name, "bf16", "none", pp=2, schedule=schedule, virtual_stages=int(virtual_stages),
                    micro_batches=int(micro_batches))
    plan = build_plan(spec)
    torch.manual_seed(0)
    model = Transformer(spec.model)
    model.init_weights()
    pipe = pipeline_for_plan(model, plan.model_dump(mode="json"), micro_batch_size=1, seq_len=T)
    tokens = torch.randint(0, spec.model.vocab_size, (int(micro_batches), T))
    with SavedForBackward(pipe.modules) as saved:  # as the training loop: each stage forward enters its autocast
        pipe.step(tokens, tokens.roll(-1, 1))  # labels, as packing makes them
    return saved.peak, plan.memory.train_stages[dist.get_rank()]


LOSS_TOKENS, LOSS_VOCAB = 256, 8193  # split unevenly over two ranks: 4,097 and 4,096 columns


def loss_labels() -> torch.Tensor:
    """Random targets, every 7th ignored, and two on either side of the split."""
    labels = torch.randint(0, LOSS_VOCAB, (LOSS_TOKENS,))
    labels[::7] = -100
    labels[1], labels[2] = 4096, 4097  # the last column of the first rank, the first of the second
    return labels


def vocabulary_parallel_loss(dtype: str) -> dict:
    """The loss and gradient of [tokens, V] logits split over the vocabulary as apply_tp's head
    leaves them (a DTensor), and of the same logits whole on each rank (torch's cross entropy);
    the bytes the split loss's forward and backward make, alive at once."""
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)  # the same logits and labels on both ranks
    whole = (3 * torch.randn(LOSS_TOKENS, LOSS_VOCAB)).to(getattr(torch, dtype)).requires_grad_()
    labels = loss_labels()
    expected = cross_entropy(whole, labels)
    (0.5 * expected).backward()
    split = distribute_tensor(whole.detach(), mesh, [Shard(1)]).requires_grad_()
    with MadeAlive() as forward:
        loss = cross_entropy(split, labels)
    with MadeAlive() as backward:
        (0.5 * loss).backward()
    grad = split.grad.full_tensor()
    return {"loss": loss.item(), "expected": expected.item(), "columns": split.to_local().shape[-1],
            "grad_error": (grad.float() - whole.grad.float()).abs().max().item(),
            "grad_scale": whole.grad.float().abs().max().item(),
            "forward": forward.peak, "backward": backward.peak}


LOSS_D, LOSS_CHUNK = 64, 100  # the chunked loss's head: [V, 64]; 100 tokens a chunk, the last 56


def vocabulary_parallel_chunked_loss(dtype: str, weights: str) -> dict:
    """The chunked loss over the rows of a [V, d] head split over the vocabulary as apply_tp leaves
    it (a DTensor), and over the whole head in one process; the bytes the split loss makes."""
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)  # the same head, inputs and labels on both ranks
    compute = getattr(torch, dtype)
    weight = torch.randn(LOSS_VOCAB, LOSS_D, dtype=getattr(torch, weights), requires_grad=True)
    x = torch.randn(LOSS_TOKENS, LOSS_D, dtype=compute, requires_grad=True)
    labels = loss_labels()
    expected = chunked_cross_entropy(x, weight, labels, LOSS_CHUNK, compute)
    (0.5 * expected).backward()
    split, inputs = distribute_tensor(weight.detach(), mesh, [Shard(0)]).requires_grad_(), x.detach().requires_grad_()
    with MadeAlive() as forward:
        loss = chunked_cross_entropy(inputs, split, labels, LOSS_CHUNK, compute)
    with MadeAlive() as backward:
        (0.5 * loss).backward()
    errors = {name: ((got.float() - want.float()).abs().max().item(), want.float().abs().max().item())
              for name, got, want in (("x", inputs.grad, x.grad), ("weight", split.grad.full_tensor(), weight.grad))}
    return {"loss": loss.item(), "expected": expected.item(), "rows": split.to_local().shape[0], "errors": errors,
            "forward": forward.peak, "backward": backward.peak}


def measure(mode: str, *args: str) -> None:
    *args, out = args
    rank = dist.get_rank()
    if mode in ("loss", "chunked-loss"):
        Path(out).mkdir(parents=True, exist_ok=True)
        result = (vocabulary_parallel_loss if mode == "loss" else vocabulary_parallel_chunked_loss)(*args)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
        return
    folder = Path(out) / f"spec{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    kept, memory = {"tp": tensor_parallel, "pp": pipeline}[mode](folder, *args)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"kept": kept, "plan": memory.activations, "in_flight": memory.in_flight_micro_batches}))
    dist.barrier()


def main():
    init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    if sys.argv[1] != "--batch":
        measure(*sys.argv[1:])
    else:  # one start of the processes (torch's import: seconds a rank) for many measurements
        from parallel_helpers import run_each
        run_each(sys.argv[2], lambda args: measure(*args), lambda args: args[-1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
