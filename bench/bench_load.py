"""Loading a model folder: llmc against reading its safetensors file alone.

`llmc eval`, `generate`, `export hf` and `quantize` start by loading a model folder. This writes
one (a ~1B-parameter Llama-style model by default, bf16) and an int4 copy of it (`llmc quantize`),
then loads each (and quantizes the first) in fresh processes and prints peak resident memory and
seconds, with their ratio to the reference, safetensors' `load_file` alone (the weights read once):

    bf16   safetensors   the reference
           llmc          runtime.model.io.load_model, as the verbs call it
           init + copy   building the model in fp32, initialising it, copying the weights in and
                         casting: what load_model did before it took the file's tensors as its own
    int4   safetensors   the reference
           llmc          runtime.infer.checkpoint.load_for_inference
           init + copy   building and initialising the fp32 model, then its quantized structure,
                         then copying the weights in (what load_for_inference did before)
    quantize safetensors reading the bf16 folder (the reference)
           llmc          `llmc quantize --bits 4` of it: runtime.infer.checkpoint.quantize_checkpoint
           fp32 copy     the same from the model loaded in fp32 (what it did before; same output)

    python bench/bench_load.py [--d-model 2048] [--layers 16] [--keep DIR]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

READ = "tensors = load_file(FOLDER + '/model.safetensors').values()"
QUANTIZE = ("with tempfile.TemporaryDirectory() as out:\n"
            "    quantize_checkpoint(FOLDER, out + '/int4', QuantConfig(bits=4))\ntensors = []")
WAYS = {
    "bf16": {
        "safetensors": READ,
        "llmc": "tensors = load_model(FOLDER)[0].state_dict().values()",
        "init + copy": (
            "model = build_model(read_plan(FOLDER)); model.load_state_dict(read_weights(FOLDER + '/model.safetensors'))\n"
            "tensors = model.to(torch.bfloat16).state_dict().values()"),
    },
    "int4": {
        "safetensors": READ,
        "llmc": "tensors = load_for_inference(FOLDER)[0].state_dict().values()",
        "init + copy": (
            "model = build_model(read_plan(FOLDER)); model.mtp = torch.nn.ModuleList()\n"
            "quantize_model(model, QuantConfig(bits=4), structure_only=True)\n"
            "model.load_state_dict(read_weights(FOLDER + '/model.safetensors'), strict=False)\n"
            "tensors = model.state_dict().values()"),
    },
    "quantize": {
        "safetensors": READ,
        "llmc": QUANTIZE,
        "fp32 copy": f"io.load_model = lambda path, device: load_model(path, device, torch.float32)\n{QUANTIZE}",
    },
}


def measure(code: str, folder: Path) -> tuple[float, float]:
    """(peak resident GiB, seconds) of `code` run in a fresh process, every tensor it ends with read
    once (safetensors maps the file: its pages are read when touched). Imports are outside the
    timing and inside the memory, alike for every way. The peak is the process's own (VmHWM: a
    child's ru_maxrss starts at its parent's)."""
    script = ("import tempfile, time, torch\nfrom safetensors.torch import load_file\n"
              "from llmc.runtime.model import io\n"
              "from llmc.runtime.model.io import build_model, load_model, read_plan, read_weights\n"
              "from llmc.runtime.infer.checkpoint import load_for_inference, quantize_checkpoint\n"
              "from llmc.runtime.infer.quantize import QuantConfig, quantize_model\n"
              f"FOLDER = {str(folder)!r}\nt = time.perf_counter()\n{code}\n"
              "sum(float(t.float().sum()) for t in tensors)\nprint(time.perf_counter() - t)\n"
              "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    return int(out[-1]) / 2 ** 20, float(out[-2])  # VmHWM is in kB


def write_folders(root: Path, d_model: int, layers: int) -> tuple[int, dict[str, Path]]:
    import torch

    from llmc.compiler.spec import ModelSpec
    from llmc.runtime.infer.checkpoint import quantize_checkpoint
    from llmc.runtime.infer.quantize import QuantConfig
    from llmc.runtime.model.io import build_model, save_model

    cfg = ModelSpec(vocab_size=32000, d_model=d_model, n_layers=layers, n_heads=d_model // 128,
                    ffn_hidden=int(2.75 * d_model) // 256 * 256, max_seq_len=2048, activation="swiglu")
    plan = {"version": 1, "spec": {"model": cfg.model_dump(mode="json")}}
    model = build_model(plan, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    save_model(model, plan, root / "bf16")
    del model
    quantize_checkpoint(root / "bf16", root / "int4", QuantConfig(bits=4))
    return n, {"bf16": root / "bf16", "int4": root / "int4", "quantize": root / "bf16"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", type=Path, help="write the model folders here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t = time.perf_counter()
        n, folders = write_folders(root, args.d_model, args.layers)
        print(f"wrote {root}/bf16 and {root}/int4 ({n / 1e9:.2f}B parameters) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
        sizes = {k: (f / "model.safetensors").stat().st_size / 2 ** 30 for k, f in folders.items()}
        results = {(k, way): measure(code, folders[k]) for k, ways in WAYS.items() for way, code in ways.items()}
    table = Table(title=f"Loading a {n / 1e9:.2f}B-parameter model folder, fresh process per row")
    for col in ("folder", "way", "peak memory GiB", "memory / safetensors", "seconds", "time / safetensors"):
        table.add_column(col, justify="right")
    for (k, way), (gb, s) in results.items():
        base_gb, base_s = results[k, "safetensors"]
        table.add_row(f"{k} ({sizes[k]:.2f} GiB)", way, f"{gb:.2f}", f"{gb / base_gb:.2f}x", f"{s:.1f}",
                      f"{s / base_s:.2f}x")
    Console(width=120).print(table)
    print(json.dumps({f"{k} {way}": {"peak_gib": round(gb, 3), "seconds": round(s, 2)}
                      for (k, way), (gb, s) in results.items()}))


if __name__ == "__main__":
    main()
