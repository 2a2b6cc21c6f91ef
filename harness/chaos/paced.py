"""A GPT whose every forward pass also takes `pace_s` of wall time, the way an accelerator's kernels do.

On a GPU VM a step is mostly accelerator time and the host CPU is free for checkpoint copies and the
startup of other processes. Simulated VMs share a few CPU cores, so a plain CPU model would make every
step time depend on whatever else the local cloud is doing. Sleeping for the accelerator keeps step
times steady and leaves the CPU to the work that really competes for it. The sleep changes no number:
results are those of the plain GPT.
"""

from __future__ import annotations

import time

import torch

from harness.models.gpt import GPT


class PacedGPT(GPT):
    def __init__(self, *args, pace_s: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        self.pace_s = pace_s

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time.sleep(self.pace_s)
        return super().forward(idx)
