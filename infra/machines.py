"""Which GPUs and how many Local SSDs each supported machine type can carry.

A small explicit table instead of an API call, so `make synth` can reject an impossible shape offline.
It covers the machine types a training cluster here would use; anything else is refused with the
list of known ones (add a row, with its source, to support it). Sources: Compute Engine's "GPU
machine types" and "Local SSD: choose a valid number of disks" pages.

- A2 Standard (a2-highgpu-*, a2-megagpu-16g): A100 40GB built in; Local SSDs optional, in the counts
  listed. A2 Ultra (a2-ultragpu-*): A100 80GB, and A3 High (a3-highgpu-8g): H100 80GB, come with a fixed
  number of Local SSDs attached automatically (none may be added or removed).
- G2 (g2-standard-*): L4 built in; Local SSDs optional, up to the listed count.
- N1: GPUs are attached separately (T4, V100, P100, P4; never A100, H100 or L4); 1-8, 16 or 24 Local SSDs.
- N2 and E2 carry no GPUs; N2 takes Local SSDs in counts that depend on its vCPUs, E2 none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """What one machine type can carry."""

    gpu_type: str | None  # built-in GPU; None when GPUs are attached separately or absent
    gpu_count: int  # built-in GPU count (0 when none are built in)
    local_ssds: tuple[int, ...]  # allowed Local SSD counts
    local_ssd_bundled: bool = False  # attached automatically: the template must not declare them
    attachable_gpus: tuple[tuple[str, tuple[int, ...]], ...] = ()  # N1: (type, allowed counts)
    gvnic: bool = False  # the machine type requires the gVNIC network interface


A100_40 = "nvidia-tesla-a100"
A100_80 = "nvidia-a100-80gb"
H100_80 = "nvidia-h100-80gb"
L4 = "nvidia-l4"
N1_GPUS = (
    ("nvidia-tesla-t4", (1, 2, 4)),
    ("nvidia-tesla-v100", (1, 2, 4, 8)),
    ("nvidia-tesla-p100", (1, 2, 4)),
    ("nvidia-tesla-p4", (1, 2, 4)),
)
N1_SSDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 24)
# Regional GPU quota metrics (Compute Engine "GPU quota"): on-demand GPUs draw on these, Spot GPUs on
# PREEMPTIBLE_<metric>. `make deploy` checks the region's limits against the topology before creating anything.
GPU_QUOTA = {
    A100_40: "NVIDIA_A100_GPUS", A100_80: "NVIDIA_A100_80GB_GPUS", H100_80: "NVIDIA_H100_GPUS", L4: "NVIDIA_L4_GPUS",
    "nvidia-tesla-t4": "NVIDIA_T4_GPUS", "nvidia-tesla-v100": "NVIDIA_V100_GPUS",
    "nvidia-tesla-p100": "NVIDIA_P100_GPUS", "nvidia-tesla-p4": "NVIDIA_P4_GPUS",
}
SPOT_QUOTA_PREFIX = "PREEMPTIBLE_"

SHAPES: dict[str, Shape] = {
    "a2-highgpu-1g": Shape(A100_40, 1, (0, 1, 2, 4, 8)),
    "a2-highgpu-2g": Shape(A100_40, 2, (0, 2, 4, 8)),
    "a2-highgpu-4g": Shape(A100_40, 4, (0, 4, 8)),
    "a2-highgpu-8g": Shape(A100_40, 8, (0, 8)),
    "a2-megagpu-16g": Shape(A100_40, 16, (0, 8)),
    "a2-ultragpu-1g": Shape(A100_80, 1, (1,), local_ssd_bundled=True),
    "a2-ultragpu-2g": Shape(A100_80, 2, (2,), local_ssd_bundled=True),
    "a2-ultragpu-4g": Shape(A100_80, 4, (4,), local_ssd_bundled=True),
    "a2-ultragpu-8g": Shape(A100_80, 8, (8,), local_ssd_bundled=True),
    "a3-highgpu-8g": Shape(H100_80, 8, (16,), local_ssd_bundled=True, gvnic=True),
    "g2-standard-4": Shape(L4, 1, (0, 1)),
    "g2-standard-8": Shape(L4, 1, (0, 1)),
    "g2-standard-12": Shape(L4, 1, (0, 1)),
    "g2-standard-16": Shape(L4, 1, (0, 1)),
    "g2-standard-24": Shape(L4, 2, (0, 2)),
    "g2-standard-32": Shape(L4, 1, (0, 1)),
    "g2-standard-48": Shape(L4, 4, (0, 4)),
    "g2-standard-96": Shape(L4, 8, (0, 8)),
}

# Families sized by vCPU count: prefix -> (pattern of the machine type name, how to build its Shape).
_N1 = re.compile(r"^n1-(standard|highmem|highcpu)-(1|2|4|8|16|32|64|96)$")
_N2 = re.compile(r"^n2-(standard|highmem|highcpu)-(2|4|8|16|32|48|64|80|96|128)$")
_E2 = re.compile(r"^e2-(standard|highmem|highcpu)-(2|4|8|16|32)$")
# N2 Local SSD counts by vCPUs (upper bound of the range -> counts).
_N2_SSDS = ((10, (1, 2, 4, 8, 16, 24)), (20, (2, 4, 8, 16, 24)), (40, (4, 8, 16, 24)),
            (80, (8, 16, 24)), (128, (16, 24)))


def shape(machine_type: str) -> Shape | None:
    """The Shape of a known machine type, or None."""
    if machine_type in SHAPES:
        return SHAPES[machine_type]
    if _N1.match(machine_type):
        return Shape(None, 0, N1_SSDS, attachable_gpus=N1_GPUS)
    if m := _N2.match(machine_type):
        vcpus = int(m.group(2))
        counts = next(c for limit, c in _N2_SSDS if vcpus <= limit)
        return Shape(None, 0, (0, *counts))
    if _E2.match(machine_type):
        return Shape(None, 0, (0,))
    return None


KNOWN = "a2-highgpu-{1,2,4,8}g, a2-megagpu-16g, a2-ultragpu-{1,2,4,8}g, a3-highgpu-8g, g2-standard-*, " \
        "n1-{standard,highmem,highcpu}-*, n2-{standard,highmem,highcpu}-*, e2-{standard,highmem,highcpu}-*"


def allowed_gpus(s: Shape) -> dict[str, tuple[int, ...]]:
    """GPU type -> allowed counts for a shape (empty when it carries none)."""
    if s.gpu_type:
        return {s.gpu_type: (s.gpu_count,)}
    return dict(s.attachable_gpus)
