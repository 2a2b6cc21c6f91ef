"""The torchrun worker of bench/gpu.py's training part: `harness.train`, unchanged, plus a record of every
step's loss at full precision (the progress line prints 4 decimals) and of what the worker ran on.

    python -m harness.launch launch.module=bench.gpu_worker ...   (GPU_BENCH_LOSSES=<file>)

Each line of the file is `<step> <loss repr>`; the first is a JSON header (backend, device, world size).
If harness.train no longer has the ProgressDisplay this wraps, the worker runs harness.train as it is and
bench/gpu.py falls back to the 4-decimal progress lines of the log.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import harness.train as train

_PATH = os.environ.get("GPU_BENCH_LOSSES")


def _header() -> str:
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    return json.dumps({
        "header": True,
        "pid": os.getpid(),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "cuda": cuda,
        "device_name": torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else None,
        "torch": torch.__version__,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "image_emulated": any(type(f).__name__ == "ImageGuard" for f in sys.meta_path),
        "wandb_imported": "wandb" in sys.modules,
    })


if _PATH and hasattr(train, "ProgressDisplay"):

    class _Recording(train.ProgressDisplay):  # type: ignore[name-defined, misc]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._record = open(_PATH, "a", buffering=1)  # noqa: SIM115 - lives as long as the loop
            self._record.write(_header() + "\n")

        def update(self, step: int, loss: float | None, step_seconds: float) -> None:
            super().update(step, loss, step_seconds)
            if loss is not None:  # read only at the steps the display shows (train.log_interval=1: all)
                self._record.write(f"{step} {float(loss)!r}\n")

        def close(self) -> None:
            super().close()
            self._record.close()

    train.ProgressDisplay = _Recording  # type: ignore[misc]


if __name__ == "__main__":
    sys.exit(train.main())
