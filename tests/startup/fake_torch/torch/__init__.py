"""Stands in for torch in startup.sh's preflight (tests/startup): no GPUs here, so what CUDA would
see comes from $STUB_GPUS, and $STUB_NO_TORCH makes the import fail as a broken install would."""

import os

if os.environ.get("STUB_NO_TORCH"):
    raise ImportError("libcudnn.so.9: cannot open shared object file")

__version__ = "2.13.0+stub"


class cuda:  # noqa: N801 - torch's own name
    @staticmethod
    def is_available() -> bool:
        return int(os.environ.get("STUB_GPUS", "0")) > 0

    @staticmethod
    def device_count() -> int:
        return int(os.environ.get("STUB_GPUS", "0"))
