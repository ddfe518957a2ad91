"""Hardware profiles: the ceilings the cost model divides by, each figure with its source.

A profile is picked for the device a graph runs on: a profile measured on
this very machine by ``sparsecc calibrate-hw`` (saved in the user cache
directory) wins; otherwise the shipped profile whose name matches
``torch.cuda.get_device_properties(...).name``; otherwise a generic one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional

import torch

from sparsecc.cache import CACHE_ENV, cache_dir  # noqa: F401 (part of this module's interface)
from sparsecc.timing import median_seconds

TFLOP = 1e12
TB = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    """Ceilings of one device.

    ``matmul_flops`` maps "bf16" / "fp16" / "fp32" to the dense matrix rate
    (FLOP/s; fp32 means the tf32 tensor-core rate on GPUs); ``vector_flops``
    is the fp32 non-matrix rate; ``bandwidth`` counts bytes read plus
    written per second; ``sources`` names where each figure comes from.
    """

    name: str
    matmul_flops: Dict[str, float]
    vector_flops: float
    bandwidth: float
    l2_bytes: int
    sm_count: int
    launch_overhead_s: float
    sources: Dict[str, str] = field(default_factory=dict)
    measured: bool = False

    def __post_init__(self):
        for key in ("bf16", "fp16", "fp32"):
            if self.matmul_flops.get(key, 0) <= 0:
                raise ValueError(f"profile {self.name}: matmul_flops[{key!r}] must be > 0")
        for attr in ("vector_flops", "bandwidth", "launch_overhead_s"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"profile {self.name}: {attr} must be > 0")

    def peak(self, dtype: torch.dtype) -> float:
        """Dense matrix rate for ``dtype``."""
        key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        return self.matmul_flops[key]

    def __str__(self) -> str:
        return (f"{self.name}{' (measured)' if self.measured else ''}: "
                f"bf16 {self.matmul_flops['bf16'] / TFLOP:.3g} TFLOP/s, {self.bandwidth / TB:.3g} TB/s, "
                f"{self.sm_count} SMs, L2 {self.l2_bytes / 2**20:.0f} MiB, "
                f"launch {self.launch_overhead_s * 1e6:.1f} us")

    def to_json(self) -> str:
        """JSON text (what ``calibrate-hw`` saves)."""
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> "HardwareProfile":
        """Inverse of ``to_json``."""
        return HardwareProfile(**json.loads(text))


_DS = "NVIDIA {} datasheet (dense, without structured sparsity)"

H100_SXM = HardwareProfile(
    name="H100 SXM",
    matmul_flops={"bf16": 738 * TFLOP, "fp16": 738 * TFLOP, "fp32": 378 * TFLOP},
    vector_flops=67 * TFLOP, bandwidth=3.0 * TB, l2_bytes=50 * 2**20, sm_count=132, launch_overhead_s=4e-6,
    sources={"bf16": "measured, bf16 GEMM 8192^3 on an H100 80GB HBM3 (TARGETS.md, 2026-11-23); datasheet 989",
             "fp16": "taken equal to bf16 (same tensor-core rate in the H100 datasheet)",
             "fp32": "tf32 datasheet rate 494.7 scaled by the measured/datasheet bf16 ratio 738/989",
             "vector_flops": _DS.format("H100 SXM"),
             "bandwidth": "measured device-to-device copy (TARGETS.md, 2026-11-23); datasheet 3.35 TB/s",
             "l2_bytes": "NVIDIA Hopper architecture whitepaper (50 MB L2)", "sm_count": "H100 SXM5: 132 SMs",
             "launch_overhead_s": "typical CUDA launch-to-launch gap on Hopper; measure with calibrate-hw"})

H200 = HardwareProfile(
    name="H200",
    matmul_flops={"bf16": 790 * TFLOP, "fp16": 790 * TFLOP, "fp32": 395 * TFLOP},
    vector_flops=67 * TFLOP, bandwidth=4.3 * TB, l2_bytes=50 * 2**20, sm_count=132, launch_overhead_s=4e-6,
    sources={"bf16": "about 790 TFLOP/s bf16 matrix rate observed on an H200 (device notes); datasheet 989",
             "fp16": "taken equal to bf16", "fp32": "half the bf16 rate (tf32, as in the datasheet ratio)",
             "vector_flops": _DS.format("H200"),
             "bandwidth": "datasheet 4.8 TB/s HBM3e scaled by the H100's measured/datasheet copy ratio 3.0/3.35",
             "l2_bytes": "same Hopper die as H100 (50 MB L2)", "sm_count": "H200 SXM: 132 SMs",
             "launch_overhead_s": "as H100"})

A100_80GB = HardwareProfile(
    name="A100 80GB",
    matmul_flops={"bf16": 312 * TFLOP, "fp16": 312 * TFLOP, "fp32": 156 * TFLOP},
    vector_flops=19.5 * TFLOP, bandwidth=2.039 * TB, l2_bytes=40 * 2**20, sm_count=108, launch_overhead_s=5e-6,
    sources={k: _DS.format("A100 80GB SXM") for k in ("bf16", "fp16", "fp32", "vector_flops", "bandwidth")}
    | {"l2_bytes": "NVIDIA Ampere GA100 whitepaper (40 MB L2)", "sm_count": "A100: 108 SMs",
       "launch_overhead_s": "typical CUDA launch gap on Ampere"})

L40S = HardwareProfile(
    name="L40S",
    matmul_flops={"bf16": 362 * TFLOP, "fp16": 362 * TFLOP, "fp32": 183 * TFLOP},
    vector_flops=91.6 * TFLOP, bandwidth=0.864 * TB, l2_bytes=96 * 2**20, sm_count=142, launch_overhead_s=5e-6,
    sources={k: _DS.format("L40S") for k in ("bf16", "fp16", "fp32", "vector_flops", "bandwidth")}
    | {"l2_bytes": "NVIDIA Ada AD102 whitepaper (96 MB L2)", "sm_count": "L40S: 142 SMs",
       "launch_overhead_s": "typical CUDA launch gap"})

L4 = HardwareProfile(
    name="L4",
    matmul_flops={"bf16": 121 * TFLOP, "fp16": 121 * TFLOP, "fp32": 60 * TFLOP},
    vector_flops=30.3 * TFLOP, bandwidth=0.3 * TB, l2_bytes=48 * 2**20, sm_count=58, launch_overhead_s=5e-6,
    sources={k: _DS.format("L4") for k in ("bf16", "fp16", "fp32", "vector_flops", "bandwidth")}
    | {"l2_bytes": "NVIDIA Ada AD104 (48 MB L2)", "sm_count": "L4: 58 SMs",
       "launch_overhead_s": "typical CUDA launch gap"})

CPU = HardwareProfile(
    name="CPU",
    matmul_flops={"bf16": 0.2 * TFLOP, "fp16": 0.1 * TFLOP, "fp32": 0.2 * TFLOP},
    vector_flops=0.1 * TFLOP, bandwidth=0.02 * TB, l2_bytes=2 * 2**20, sm_count=1, launch_overhead_s=2e-6,
    sources={"all": "order-of-magnitude figures for a few-core server CPU (not measured); "
                    "auto keeps CPU sites dense, so no CPU decision hinges on them. calibrate-hw measures them"})

# Shipped profiles, matched against the CUDA device name (lower case substring -> profile).
PROFILES: Dict[str, HardwareProfile] = {"h100": H100_SXM, "h200": H200, "a100": A100_80GB, "l40s": L40S,
                                        "l4": L4}
GENERIC_CUDA = replace(H100_SXM, name="unknown CUDA GPU (H100 figures)",
                       sources={"all": "no profile matches this GPU; H100 figures stand in. Run calibrate-hw"})


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).name
    return "cpu"


def _cache_path(device_name: str) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in device_name.lower())
    return os.path.join(cache_dir(), "hardware", f"{safe}.json")


def profile_for(device: torch.device) -> HardwareProfile:
    """The profile for ``device``: a measured one from the cache, else a shipped one, else a generic one."""
    name = _device_name(device)
    path = _cache_path(name)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                return HardwareProfile.from_json(fh.read())
        except (ValueError, TypeError, OSError):
            pass  # a broken cache file is ignored; the shipped profile applies
    if device.type != "cuda":
        return CPU
    lowered = name.lower()
    # Longest key first, so "l40s" wins over "l4".
    for key in sorted(PROFILES, key=len, reverse=True):
        if key in lowered:
            return PROFILES[key]
    return GENERIC_CUDA


def _copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds


def measure_profile(device: torch.device, size: Optional[int] = None, progress: bool = True) -> HardwareProfile:
    """Measure copy bandwidth, GEMM rate per dtype and launch overhead on ``device``.

    ``size`` is the GEMM edge (default 8192 on CUDA, 1024 on CPU); the copy
    moves 1 GiB on CUDA (64 MiB on CPU) so it is far larger than any cache.
    """
    from tqdm.auto import tqdm

    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 1024)
    repeats = 20 if cuda else 3
    base = profile_for(device) if cuda else CPU
    steps = tqdm(total=5, desc="sparsecc calibrate-hw", disable=not progress)
    bandwidth = _copy_bandwidth(device, (2**30 if cuda else 2**26), repeats)
    steps.update()
    rates = {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.matmul(a, b)
        rates[key] = 2 * size**3 / median_seconds(lambda: torch.matmul(a, b), device, repeats)
        steps.update()
    tiny = torch.zeros(1, device=device)
    launches = 200
    per_launch = median_seconds(lambda: [tiny.add_(1) for _ in range(launches)], device, repeats) / launches
    steps.update()
    steps.close()
    when = time.strftime("%Y-%m-%d")
    src_note = f"measured by sparsecc calibrate-hw on {when}"
    return replace(base, name=_device_name(device) if cuda else "CPU", matmul_flops=rates, bandwidth=bandwidth,
                   launch_overhead_s=per_launch, measured=True,
                   sources={**base.sources, "bf16": src_note, "fp16": src_note, "fp32": src_note,
                            "bandwidth": src_note, "launch_overhead_s": src_note})


def save_profile(profile: HardwareProfile, device: torch.device) -> str:
    """Save a measured profile where ``profile_for(device)`` will find it; return the path."""
    path = _cache_path(_device_name(device))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(profile.to_json())
    return path
