"""The accelerator catalog: memory, dense peak throughput and links of the devices llmc plans for.

Peaks are dense (no sparsity) tensor-core figures from the vendors' datasheets, with fp32
accumulation where the datasheet distinguishes it. Bandwidths are per device, one direction.
"""

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    peak_tflops_bf16: float            # dense, per device
    peak_tflops_fp8: float | None      # dense, per device; None where the device has no fp8 tensor cores
    intra_node_gbps: float             # GB/s per device inside a node (NVLink / PCIe), one direction
    inter_node_gbps: float             # GB/s per device across nodes (InfiniBand / Ethernet), one direction
    max_per_node: int
    kind: str = "gpu"


CATALOG: dict[str, Accelerator] = {a.name: a for a in [
    Accelerator("A100-40GB", 40 * GiB, 312.0, None, 300.0, 25.0, 8),
    Accelerator("A100-80GB", 80 * GiB, 312.0, None, 300.0, 25.0, 8),
    Accelerator("H100-80GB", 80 * GiB, 989.4, 1978.9, 450.0, 50.0, 8),
    # H800: the H100 compute die with NVLink cut to 400 GB/s (both directions); DeepSeek-V3's cluster
    # reports about 160 GB/s achievable NVLink and 50 GB/s InfiniBand per GPU.
    Accelerator("H800-80GB", 80 * GiB, 989.4, 1978.9, 160.0, 50.0, 8),
    Accelerator("H200-141GB", 141 * 10**9, 989.4, 1978.9, 450.0, 50.0, 8),
    Accelerator("RTX3060-12GB", 12 * GiB, 25.6, None, 16.0, 1.25, 8),
    Accelerator("RTX4090-24GB", 24 * GiB, 165.2, 330.3, 32.0, 3.0, 8),
    # A CPU "device" is one process on a host: peak is a rough AVX-512 bf16 figure; links are memory copies.
    Accelerator("CPU", 24 * GiB, 1.0, None, 10.0, 1.0, 64, kind="cpu"),
]}

ALIASES = {"H100": "H100-80GB", "H800": "H800-80GB", "H200": "H200-141GB", "A100": "A100-80GB",
           "RTX3060": "RTX3060-12GB", "RTX4090": "RTX4090-24GB"}


def lookup(name: str) -> Accelerator:
    return CATALOG[ALIASES.get(name, name)]


def known_names() -> list[str]:
    return sorted(CATALOG) + sorted(ALIASES)
