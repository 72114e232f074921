"""The accelerator catalog: memory, dense peak throughput and links of the devices llmc plans for.

Peaks are dense (no sparsity) tensor-core figures from the vendors' datasheets (SXM/OAM parts),
with fp32 accumulation where the datasheet distinguishes it. Bandwidths are per device, one
direction, in GB/s (1e9 bytes/s). Memory is as the vendor states it: "80GB" parts are 80 GiB of
HBM; H200's 141 GB and B200's 180 GB and MI300X's 192 GB are decimal.
"""

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    peak_tflops_bf16: float            # dense, per device (also fp16)
    peak_tflops_fp8: float | None      # dense, per device; None where the device has no fp8 tensor cores
    intra_node_gbps: float             # GB/s per device inside a node (NVLink / PCIe), one direction
    inter_node_gbps: float             # GB/s per device across nodes (InfiniBand / Ethernet), one direction
    max_per_node: int
    kind: str = "gpu"
    vendor: str = "nvidia"             # who makes it: "nvidia", "amd" ("" for the CPU); names its device plugins
    peak_tflops_fp32: float | None = None  # dense TF32 tensor-core rate (fp32 training); None = bf16 / 2
    note: str = ""

    def rate_precision(self, precision: str) -> str:
        """The precision whose tensor-core rate a training precision runs at here: fp8 runs at
        bf16's on devices without fp8 (the runtime then widens its fp8 operands to bf16)."""
        return "bf16" if precision == "fp8" and not self.peak_tflops_fp8 else precision

    def peak_tflops(self, precision: str) -> float:
        """Dense peak TFLOP/s at a training precision (`rate_precision`)."""
        precision = self.rate_precision(precision)
        if precision == "fp8":
            return self.peak_tflops_fp8
        if precision == "fp32":
            return self.peak_tflops_fp32 or self.peak_tflops_bf16 / 2
        return self.peak_tflops_bf16


CATALOG: dict[str, Accelerator] = {a.name: a for a in [
    Accelerator("A100-40GB", 40 * GiB, 312.0, None, 300.0, 25.0, 8, peak_tflops_fp32=156.0,
                note="SXM4, NVLink3 600 GB/s, HDR InfiniBand 200 Gb/s"),
    Accelerator("A100-80GB", 80 * GiB, 312.0, None, 300.0, 25.0, 8, peak_tflops_fp32=156.0,
                note="SXM4, NVLink3 600 GB/s, HDR InfiniBand 200 Gb/s"),
    Accelerator("H100-80GB", 80 * GiB, 989.4, 1978.9, 450.0, 50.0, 8, peak_tflops_fp32=494.7,
                note="SXM5, NVLink4 900 GB/s, NDR InfiniBand 400 Gb/s"),
    # H800: the H100 compute die with NVLink cut to 400 GB/s (both directions); DeepSeek-V3's report
    # measures about 160 GB/s achievable NVLink and 50 GB/s InfiniBand per GPU.
    Accelerator("H800-80GB", 80 * GiB, 989.4, 1978.9, 160.0, 50.0, 8, peak_tflops_fp32=494.7,
                note="SXM5, NVLink 400 GB/s (about 160 GB/s achieved), InfiniBand 400 Gb/s"),
    Accelerator("H200-141GB", 141 * 10**9, 989.4, 1978.9, 450.0, 50.0, 8, peak_tflops_fp32=494.7,
                note="SXM, HBM3e, NVLink4 900 GB/s"),
    Accelerator("B200-180GB", 180 * 10**9, 2250.0, 4500.0, 900.0, 50.0, 8, peak_tflops_fp32=1100.0,
                note="DGX B200, NVLink5 1.8 TB/s, InfiniBand 400 Gb/s"),
    Accelerator("MI300X-192GB", 192 * 10**9, 1307.4, 2614.9, 448.0, 50.0, 8, vendor="amd", peak_tflops_fp32=653.7,
                note="OAM, Infinity Fabric 7 x 64 GB/s"),
    Accelerator("RTX3060-12GB", 12 * GiB, 25.6, None, 16.0, 1.25, 8, peak_tflops_fp32=12.8,
                note="PCIe 4.0 x16, 10 GbE"),
    Accelerator("RTX4090-24GB", 24 * GiB, 165.2, 330.3, 32.0, 3.0, 8, peak_tflops_fp32=82.6,
                note="PCIe 4.0 x16, 25 GbE"),
    # A CPU "device" is one process on a host: peak is a rough AVX-512 bf16 figure, fp32 half of it (what
    # oneDNN reaches, runtime/model/linear.py; MKL about half that on AMD); links are memory copies.
    Accelerator("CPU", 24 * GiB, 1.0, None, 10.0, 1.0, 64, kind="cpu", vendor="",
                note="one process on a host; rough figures"),
]}

ALIASES = {"H100": "H100-80GB", "H800": "H800-80GB", "H200": "H200-141GB", "A100": "A100-80GB",
           "B200": "B200-180GB", "MI300X": "MI300X-192GB", "RTX3060": "RTX3060-12GB", "RTX4090": "RTX4090-24GB"}


def lookup(name: str) -> Accelerator:
    return CATALOG[ALIASES.get(name, name)]


def training_peak(hw, precision: str) -> tuple[float, str]:
    """(dense peak TFLOP/s per device, the precision whose rate it is) of a `[hardware]` table:
    its peak_tflops override, else the catalog's."""
    if hw.peak_tflops:
        return hw.peak_tflops, precision
    device = lookup(hw.accelerator)
    return device.peak_tflops(precision), device.rate_precision(precision)


def known_names() -> list[str]:
    return sorted(CATALOG) + sorted(ALIASES)
