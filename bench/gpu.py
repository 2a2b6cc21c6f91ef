"""The GPU run of issue 18, one part per process, driven by bench/gpu.sh (read its header first).

    python -m bench.gpu env        --out F [--device cuda|cpu]
    python -m bench.gpu checkpoint --out F --sizes 1 6 18 --budget-s S [--device cuda|cpu] [--dir D]
    python -m bench.gpu train      --out F --work D --budget-s S [--device cuda|cpu] [--mode gpu|rehearse]
    python -m bench.gpu merge      --out F --parts-dir D --mode gpu|rehearse [--status part=rc ...]

env         GPU model, driver, CUDA, torch, nccl, the disk measured, and the torch API differences that
            matter here (torch 2.11 on the GPU machine, 2.13 in the lock).
checkpoint  (1) for each state size (GB = 1e9 bytes of fp32 params + AdamW exp_avg/exp_avg_sq, on the GPU):
            our engine's first and steady pause, time to durable (save() -> commit report), a raw threaded
            write of the same bytes + fsync, the pinned D2H copy floor into buffers allocated once, an
            emergency save_now (and one behind an in-flight periodic save), restore; peers torch.save +
            fsync, DCP async_save default, DCP async_save with a pinned DefaultStager (its first call, and a
            second). (3) is the emergency save_now at the largest size, against the 30 s notice.
train       (2) the real trainer on the GPU (see run_train).
merge       one JSON with every part, the machine and each target marked met / missed / not measured.

The checkpoint part imports the engine only (harness.checkpoint, harness.state, harness.distributed): no
hydra, omegaconf or wandb (checked at the end: `forbidden_imports`). Every part writes its JSON after each
measurement and guards its time: a measurement whose estimate (from the throughput seen so far) does not
fit the part's budget is skipped with a note rather than cut off by bench/gpu.sh's hard timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.process_tree import kill_tree

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
FORBIDDEN = ("hydra", "omegaconf", "wandb")
EMERGENCY_DEADLINE_S = 25.0  # preemption.deadline_s: durable by then, inside the 30 s Spot notice
NOTICE_S = 30.0
TARGETS = {
    "pause_over_floor": 2.0,  # steady training pause <= 2x the pinned D2H copy into buffers allocated once
    "durable_over_raw": 1.2,  # time to durable (committed) <= 1.2x a raw threaded write + fsync
    "emergency_s": EMERGENCY_DEADLINE_S,  # emergency save of the ~18 GB state durable within the deadline
}


# ------------------------------------------------------------------ common


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def mount_of(path: Path) -> dict[str, str]:
    """The mount holding `path` (longest mount point prefix in /proc/mounts): device and fs type."""
    best = {"mount": "", "device": "", "fstype": ""}
    real = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best["mount"]):
                    best = {"mount": mnt, "device": dev, "fstype": fstype}
    except OSError:
        pass
    return best


def scratch_root(explicit: str | None) -> Path:
    """Where the big files go: --dir / GPU_BENCH_DIR, else the temp dir unless it is in memory (tmpfs),
    else a folder in the checkout (on the machine's disk)."""
    chosen = explicit or os.environ.get("GPU_BENCH_DIR") or ""
    if chosen:
        root = Path(chosen)
    else:
        root = Path(tempfile.gettempdir())
        if mount_of(root)["fstype"] in ("tmpfs", "ramfs"):
            root = REPO / ".gpu-scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def disk_info(root: Path) -> dict[str, Any]:
    usage = shutil.disk_usage(root)
    return {"path": str(root), **mount_of(root), "free_bytes": usage.free, "total_bytes": usage.total}


def forbidden_imports() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)


def host_empty_cache() -> bool:
    """Release the CUDA caching host allocator's pinned blocks: freed pinned buffers stay cached there,
    which would let a later 'first' pinned allocation reuse them (and keep the memory)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        fn = getattr(torch._C, "_host_emptyCache", None)
        if fn is not None:
            fn()
            return True
    return False


def pinned_host_stats(logical_bytes: int) -> dict[str, Any] | None:
    """The CUDA caching host allocator's pinned bytes against the bytes asked for (engine snapshot buffers +
    reference buffers): it rounds blocks up to powers of two below a threshold, so it can hold up to 2x."""
    import torch

    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception as err:  # noqa: BLE001 - diagnostic only
        return {"error": f"{type(err).__name__}: {err}"}
    held = stats.get("allocated_bytes.current") or stats.get("allocated_bytes", {}).get("current")
    return {"allocated_bytes_current": held, "requested_bytes": logical_bytes,
            "ratio": held / logical_bytes if held and logical_bytes else None}


class Budget:
    """A part's time guard: estimates from the throughput seen so far decide what still fits."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.rates: dict[str, float] = {}  # seconds per byte, by measurement kind

    def left(self) -> float:
        return self.deadline - time.monotonic()

    DEFAULT_S_PER_GB = {"build": 1.0, "copy": 0.5, "write": 2.0, "engine_first": 4.0, "restore": 2.0}

    def estimate(self, kind: str, nbytes: float, family: str = "write") -> float:
        rate = self.rates.get(kind, self.DEFAULT_S_PER_GB.get(family, 2.0) / GB)
        return 1.0 + rate * nbytes

    def learn(self, kind: str, nbytes: float, seconds: float) -> None:
        if nbytes > 0:
            self.rates[kind] = seconds / nbytes

    def fits(self, kind: str, nbytes: float, notes: list[str], what: str, family: str = "write",
             reserve_s: float = 5.0) -> bool:
        return self.fits_s(self.estimate(kind, nbytes, family), notes, what, reserve_s)

    def fits_s(self, need: float, notes: list[str], what: str, reserve_s: float = 5.0) -> bool:
        left = self.left()
        if need + reserve_s <= left:
            return True
        notes.append(f"{what}: skipped by the time guard (needs ~{need:.0f}s, {left:.0f}s left)")
        return False


# --------------------------------------------------------------------- env


def nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"available": False}
    out: dict[str, Any] = {"available": True}
    fields = "name,driver_version,memory.total,pci.bus_id,pcie.link.gen.current,pcie.link.width.current"
    try:
        q = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        out["gpus"] = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))
                       for line in q.stdout.strip().splitlines()]
        plain = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
        for token in ("CUDA Version:", "Driver Version:"):
            if token in plain:
                out[token.rstrip(":").lower().replace(" ", "_")] = plain.split(token, 1)[1].split()[0]
    except (OSError, subprocess.SubprocessError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def torch_api() -> dict[str, Any]:
    """The torch features this code and the engine rely on, as this torch has them."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as dcp_state_dict

    api: dict[str, Any] = {}
    try:
        from torch.utils.serialization import config as ser_config

        api["serialization_config_save_compute_crc32"] = hasattr(ser_config.save, "compute_crc32")
    except Exception as err:  # noqa: BLE001 - the engine's _without_zip_crc32 needs it
        api["serialization_config_save_compute_crc32"] = f"missing: {type(err).__name__}: {err}"
    api["async_save_params"] = list(inspect.signature(dcp.async_save).parameters)
    try:
        from torch.distributed.checkpoint import staging

        api["staging"] = sorted(n for n in dir(staging) if n[0].isupper())
        if hasattr(staging, "StagingOptions"):
            api["StagingOptions_fields"] = [f.name for f in dataclasses.fields(staging.StagingOptions)]
    except Exception as err:  # noqa: BLE001
        api["staging"] = f"missing: {type(err).__name__}: {err}"
    try:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        api["AsyncCheckpointerType"] = [t.name for t in AsyncCheckpointerType]
    except Exception as err:  # noqa: BLE001
        api["AsyncCheckpointerType"] = f"missing: {type(err).__name__}: {err}"
    writer = dcp.FileSystemWriter
    api["FileSystemWriter_mro"] = [c.__name__ for c in writer.__mro__]
    api["FileSystemWriter_params"] = list(inspect.signature(writer.__init__).parameters)[1:]
    from harness.launch import torchrun_has_shutdown_timeout  # noqa: PLC0415 - with the wheels on the path

    api["torchrun_accepts_shutdown_timeout"] = torchrun_has_shutdown_timeout()  # harness.launch adds it if so
    api["host_emptyCache"] = hasattr(torch._C, "_host_emptyCache")
    api["nccl_available"] = dist.is_available() and dist.is_nccl_available()
    api["state_dict_api"] = all(hasattr(dcp_state_dict, n) for n in ("get_state_dict", "set_state_dict"))
    return api


def probe_env(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem": meminfo(),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "requested_device": device,
        "nvidia_smi": nvidia_smi(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        info.update({
            "device_name": torch.cuda.get_device_name(i),
            "device_count": torch.cuda.device_count(),
            "capability": list(torch.cuda.get_device_capability(i)),
            "device_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "cudnn": torch.backends.cudnn.version(),
        })
        try:
            import torch.cuda.nccl as nccl

            version = nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as err:  # noqa: BLE001 - diagnostic only
            info["nccl"] = f"{type(err).__name__}: {err}"
    try:
        info["torch_api"] = torch_api()
    except Exception as err:  # noqa: BLE001 - a probe must not fail the run
        info["torch_api"] = f"{type(err).__name__}: {err}"
    try:
        info["disk"] = disk_info(scratch_root(None))
    except OSError as err:
        info["disk"] = f"{type(err).__name__}: {err}"
    shipped = {}
    for name in ("google_crc32c", "hydra", "omegaconf", "google.protobuf", "google.api", "wandb"):
        try:
            module = __import__(name, fromlist=["_"])
            shipped[name] = {"version": getattr(module, "__version__", None),
                             "file": getattr(module, "__file__", None) or list(getattr(module, "__path__", []))}
        except Exception as err:  # noqa: BLE001
            shipped[name] = f"{type(err).__name__}: {err}"
    info["modules"] = shipped
    if "google_crc32c" in sys.modules:
        info["crc32c_implementation"] = getattr(sys.modules["google_crc32c"], "implementation", None)
    return info


def cmd_env(args: argparse.Namespace) -> int:
    info = {"part": "env", **probe_env(args.device)}
    write_json(Path(args.out), info)
    print(json.dumps({k: v for k, v in info.items() if k != "torch_api"}, indent=1, default=str)[:4000])
    return 0


# -------------------------------------------------------------- checkpoint


def pick_device(name: str):
    import torch

    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    if name == "auto" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_train_state(model, optimizer, device):
    """TrainState(model, optimizer, rank[, device]): the device argument is new (CUDA RNG per device)."""
    from harness.state import TrainState

    params = inspect.signature(TrainState).parameters
    return TrainState(model, optimizer, rank=0, **({"device": device} if "device" in params else {}))


def build_state(target_bytes: float, width: int, device, seed: int):
    import torch
    import torch.nn as nn

    per_layer = 3 * 4 * (width * width + width)
    n_layers = max(1, round(target_bytes / per_layer))
    torch.manual_seed(seed)
    # built on the device: initialising 6 GB of parameters on the host first would take longer than a save
    model = nn.Sequential(*[nn.Linear(width, width, device=device) for _ in range(n_layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return make_train_state(model, opt, device), n_layers


def plain(tree: Any) -> Any:
    """Mappings as plain dicts (torch 2.11's DefaultStager raised KeyError on an OrderedDict)."""
    if isinstance(tree, Mapping):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [plain(v) for v in tree]
    return tree


def engine_config(work: Path, write_threads: int):
    """bench.checkpoint's engine config (CheckpointConfig's defaults, no hydra) with retention deleting
    nothing: this code deletes explicitly, so that one checkpoint at a time sits on the disk."""
    from bench.checkpoint import engine_config as config_for

    return config_for(work, write_threads, keep=1000)


def delete_steps(manager, keep: set[int] = frozenset()) -> None:
    store = manager.tiers[0].store
    for step in store.committed_steps():
        if step not in keep:
            store.delete(step)


def save_and_commit(manager, state, step: int, timeout_s: float) -> dict[str, Any]:
    from bench.checkpoint import one_save

    return one_save(manager, state, step, timeout_s=timeout_s)


def dcp_peer(kind: str, state, directory: Path, threads: int, device, calls: int, budget: Budget, nbytes: int,
             notes: list[str]) -> dict[str, Any]:
    """DCP async_save as users call it: `default` (no stager given), or `pinned` (a DefaultStager with
    pinned memory and async staging, kept across calls). pause = until the loop may step the optimizer
    again: the call's return for default (it stages synchronously), the staging future for pinned."""
    import torch
    import torch.distributed.checkpoint as dcp

    from bench.checkpoint import _flush_os

    params = inspect.signature(dcp.async_save).parameters
    kwargs: dict[str, Any] = {"no_dist": True} if "no_dist" in params else {}
    out: dict[str, Any] = {"kind": kind, "calls": []}
    stager = None
    if kind == "pinned":
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        except ImportError as err:
            return {**out, "available": False, "note": f"no DefaultStager in torch {torch.__version__}: {err}"}
        if "async_stager" not in params:
            return {**out, "available": False, "note": "dcp.async_save takes no async_stager here"}
        cuda = device.type == "cuda"
        wanted = {"use_pinned_memory": cuda, "use_shared_memory": False, "use_async_staging": True,
                  "use_non_blocking_copy": cuda}
        known = {f.name for f in dataclasses.fields(StagingOptions)}
        options = {k: v for k, v in wanted.items() if k in known}
        out["staging_options"] = options
        try:
            stager = DefaultStager(StagingOptions(**options))
        except Exception as err:  # noqa: BLE001 - recorded: the API differs between versions
            return {**out, "available": False, "note": f"DefaultStager(...) failed: {type(err).__name__}: {err}"}
        kwargs["async_stager"] = stager
    out["available"] = True
    try:
        for i in range(calls):
            if not budget.fits(f"dcp_{kind}", nbytes, notes, f"DCP {kind} call {i + 1}"):
                break
            target = directory / f"dcp-{kind}-{i}"
            writer = dcp.FileSystemWriter(target, sync_files=True, thread_count=threads)
            sd = plain(state.to_dcp())
            _flush_os()
            t0 = time.perf_counter()
            row: dict[str, Any] = {}
            try:
                response = dcp.async_save(sd, storage_writer=writer, **kwargs)
                row["call_return_s"] = time.perf_counter() - t0
                if hasattr(response, "staging_completion"):
                    response.staging_completion.result()
                    row["staged_s"] = time.perf_counter() - t0
                    response.upload_completion.result()
                    row["response"] = "AsyncSaveResponse"
                else:
                    row["staged_s"] = row["call_return_s"]
                    response.result()
                    row["response"] = type(response).__name__
                row["durable_s"] = time.perf_counter() - t0
                row["pause_s"] = row["staged_s"]
                budget.learn(f"dcp_{kind}", nbytes, row["durable_s"])
            except Exception as err:  # noqa: BLE001 - e.g. torch 2.11's DefaultStager KeyError on a 2nd save
                row["error"] = f"{type(err).__name__}: {err}"
                row["failed_after_s"] = time.perf_counter() - t0
            finally:
                del sd
                shutil.rmtree(target, ignore_errors=True)
            out["calls"].append(row)
            if "error" in row:
                break
    finally:
        if stager is not None:
            with contextlib.suppress(Exception):
                stager.close()
    return out


def fits_memory(target: float, device, host_budget: float) -> str | None:
    """None if a state of `target` bytes fits, else why not. Host at the peak: the engine's snapshot
    buffers plus the reference buffers (or a DCP staging copy), 2.3x on GPU; on CPU the state itself too."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if 3.2 * target > free:  # the state + a fresh one for the restore, whose AdamW step makes temporaries
            return f"needs ~{3.2 * target / GB:.0f} GB of GPU memory (state, restored state, transients), " \
                   f"{free / GB:.0f} GB free"
        need = 2.3 * target
    else:
        need = 3.3 * target
    if need > host_budget:
        return f"needs ~{need / GB:.0f} GB of host memory, budget {host_budget / GB:.0f} GB " \
               "(MemAvailable, or --host-mem-gb / GPU_BENCH_HOST_MEM_GB)"
    return None


def bench_size(target_gb: float, args, device, root: Path, budget: Budget, host_budget: float,
               on_update) -> dict[str, Any]:
    """One state size; `on_update(row)` after each measurement so a killed part keeps what it measured."""
    from bench.checkpoint import (
        _flush_os,
        host_buffers,
        same_state,
        state_tensors,
        time_memcpy,
        time_raw_write,
        time_torch_save,
    )
    from harness.checkpoint.manager import CheckpointManager
    from harness.distributed import Dist

    notes: list[str] = []
    row: dict[str, Any] = {"target_gb": target_gb, "notes": notes, "measured": []}
    target = target_gb * GB
    why = fits_memory(target, device, host_budget)
    if why:
        row["skipped"] = f"{target_gb:g} GB does not fit: {why}"
        return row
    free = shutil.disk_usage(root).free
    if free < 1.2 * target:
        reduced = free / 1.3
        if reduced < 0.5 * target:
            row["skipped"] = f"{target_gb:g} GB does not fit the disk: {free / GB:.1f} GB free under {root}"
            return row
        notes.append(f"reduced from {target_gb:g} GB to {reduced / GB:.1f} GB to fit the disk "
                     f"({free / GB:.1f} GB free)")
        target = reduced
    if not budget.fits("build", 2 * target, notes, "building the state and the floor's pinned buffers", "build",
                       reserve_s=30):
        row["skipped"] = notes[-1]
        return row

    t0 = time.perf_counter()
    state, n_layers = build_state(target, args.width, device, seed=0)
    tensors = state_tensors(state)
    size = sum(t.numel() * t.element_size() for t in tensors)
    row.update({"bytes": size, "gb": size / GB, "layers": n_layers, "width": args.width, "tensors": len(tensors),
                "threads": args.threads, "build_s": time.perf_counter() - t0, "loadavg_before": os.getloadavg()})
    on_update(row)
    work = root / f"size{target_gb:g}"
    work.mkdir(parents=True, exist_ok=True)
    repeats = 1 if size >= 10 * GB else args.repeats

    # ---- the engine: first save, then steady saves interleaved with the floor (e) and the raw write (f)
    t0 = time.perf_counter()
    bufs = host_buffers(tensors)  # the floor's buffers: pinned on GPU, allocated once
    time_memcpy(tensors, bufs, device, 1)  # fault the pages in
    row["reference_buffers_alloc_s"] = time.perf_counter() - t0
    budget.learn("build", 2 * size, row["build_s"] + row["reference_buffers_alloc_s"])
    cfg = engine_config(work, args.threads)
    manager = CheckpointManager(cfg, Dist(device=device))
    step = 1
    try:
        if budget.fits("engine_first", size, notes, "engine first save", "engine_first"):
            first = save_and_commit(manager, state, step, timeout_s=max(30.0, budget.left()))
            budget.learn("engine_first", size, first["commit_s"])
            budget.learn("engine", size, first["commit_s"])
            row.update({"b_first_pause_s": first["pause_s"], "c_first_commit_s": first["commit_s"],
                        "c_first_writer_s": first["writer_s"], "pinned_host": pinned_host_stats(2 * size)})
            row["measured"].append("engine_first")
            on_update(row)
        saves, e_samples, f_samples = [], [], []
        for _ in range(repeats):
            need = budget.estimate("raw", size) + budget.estimate("engine", size)
            if not budget.fits_s(need, notes, "steady save with its floor and raw-write samples"):
                break
            delete_steps(manager)  # one checkpoint on the disk at a time
            e_samples.append(time_memcpy(tensors, bufs, device, 3))
            wall, cpu = time_raw_write(bufs, work / "raw", args.threads)
            budget.learn("raw", size, wall)
            f_samples.append((wall, cpu))
            step += 1
            saves.append(save_and_commit(manager, state, step, timeout_s=max(30.0, budget.left())))
            budget.learn("engine", size, saves[-1]["commit_s"])
            best = min(saves, key=lambda r: r["pause_s"])
            best_c = min(saves, key=lambda r: r["commit_s"])
            row.update({
                "b_pause_s": best["pause_s"], "b_second_pause_s": saves[0]["pause_s"],
                "b_samples_s": [r["pause_s"] for r in saves],
                "c_commit_s": best_c["commit_s"], "c_second_commit_s": saves[0]["commit_s"],
                "c_samples_s": [r["commit_s"] for r in saves], "c_writer_s": best_c["writer_s"],
                "c_cpu_s": best_c["cpu_s"], "waited_s": max(r["waited_s"] for r in saves),
                "e_floor_s": min(e_samples), "e_samples_s": e_samples, "e_floor_gbps": size / GB / min(e_samples),
                "f_raw_write_s": min(w for w, _ in f_samples), "f_samples_s": [w for w, _ in f_samples],
                "f_raw_write_gbps": size / GB / min(w for w, _ in f_samples),
            })
            if "engine_steady" not in row["measured"]:
                row["measured"].append("engine_steady")
            on_update(row)

        # ---- (3) the emergency save: save_now of a new step with the buffers warm (as after periodic saves)
        if budget.fits("engine", size, notes, "emergency save_now"):
            delete_steps(manager)
            step += 1
            state.progress.step = step
            _flush_os()
            report = manager.save_now(step, state, deadline_s=EMERGENCY_DEADLINE_S)
            manager.drain_reports()
            row.update({"emergency_s": report.seconds, "emergency_ok": report.ok, "emergency_tier": report.tier,
                        "emergency_deadline_s": EMERGENCY_DEADLINE_S})
            row["measured"].append("emergency")
            on_update(row)
        # ... and behind an in-flight periodic save (the notice arrives just after a save began)
        two_fit = shutil.disk_usage(root).free + size > 2.2 * size  # the emergency checkpoint goes first
        if not two_fit:
            notes.append("emergency save_now behind an in-flight save: skipped, the disk cannot hold two "
                         f"checkpoints ({shutil.disk_usage(root).free / GB:.1f} GB free)")
        if two_fit and budget.fits("engine", 2 * size, notes, "emergency save_now behind an in-flight save"):
            delete_steps(manager)
            state.progress.step = step + 1
            _flush_os()
            t0 = time.perf_counter()
            manager.save(step + 1, state)
            state.progress.step = step + 2
            report = manager.save_now(step + 2, state, deadline_s=EMERGENCY_DEADLINE_S)
            manager.drain_reports()
            step += 2
            row.update({"emergency_behind_inflight_s": time.perf_counter() - t0,
                        "emergency_behind_inflight_ok": report.ok})
            row["measured"].append("emergency_behind_inflight")
            delete_steps(manager, keep={step})
            on_update(row)
    finally:
        manager.close()
        del bufs, manager
        row["host_cache_emptied"] = host_empty_cache()

    # ---- restore into a fresh state with a fresh manager, as a resumed process would (warm page cache)
    committed_now = CheckpointManager(cfg, Dist(device=device))
    try:
        has_ckpt = bool(committed_now.tiers[0].store.committed_steps())
        if has_ckpt and budget.fits("restore", 2 * size, notes, "restore", "restore"):
            fresh, _ = build_state(size, args.width, device, seed=1)
            _flush_os()
            t0 = time.perf_counter()
            restored = committed_now.restore(fresh)
            row["d_restore_s"] = time.perf_counter() - t0
            budget.learn("restore", size, row["d_restore_s"])
            row["restored_step"] = restored.step if restored else None
            row["restore_exact"] = bool(restored) and same_state(state, fresh)
            row["measured"].append("restore")
            del fresh
            on_update(row)
    finally:
        committed_now.close()
        del committed_now
        shutil.rmtree(work / "store", ignore_errors=True)
        host_empty_cache()

    # ---- peers: DCP async_save with the pinned stager, DCP async_save default, torch.save + fsync
    row["dcp_pinned"] = dcp_peer("pinned", state, work, args.threads, device, 2, budget, size, notes)
    host_empty_cache()
    on_update(row)
    row["dcp_default"] = dcp_peer("default", state, work, args.threads, device, 1 if size >= 5 * GB else 2,
                                  budget, size, notes)
    gc.collect()
    on_update(row)
    if budget.fits("torch_save", size, notes, "torch.save + fsync"):
        samples = []
        for _ in range(1 if size >= 5 * GB else 2):
            _flush_os()
            path = work / "torch_save.pt"
            samples.append(time_torch_save(state, path))
            path.unlink()
            budget.learn("torch_save", size, samples[-1])
            if not budget.fits("torch_save", size, [], ""):
                break
        row.update({"a_torch_save_s": min(samples), "a_samples_s": samples})
        row["measured"].append("torch_save")
        on_update(row)

    del state, tensors
    host_empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    row["loadavg_after"] = os.getloadavg()
    return row


def cmd_checkpoint(args: argparse.Namespace) -> int:
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("harness.checkpoint").setLevel(logging.WARNING)
    budget = Budget(args.budget_s)
    device = pick_device(args.device)
    if args.width is None:
        args.width = 4096 if device.type == "cuda" else 1024
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-ckpt-", dir=scratch_root(args.dir)))
    mem = meminfo()
    # a VM whose memory grows on use can under-report MemAvailable: MemTotal and --host-mem-gb count too
    host_budget = max(0.9 * mem.get("MemAvailable", 0), 0.8 * mem.get("MemTotal", 0),
                      0.9 * (args.host_mem_gb or 0) * GB)
    out = Path(args.out)
    result: dict[str, Any] = {
        "part": "checkpoint", "mode": args.mode, "device": str(device), "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "sizes_requested_gb": args.sizes, "disk": disk_info(root), "mem": mem, "host_budget_bytes": host_budget,
        "budget_s": args.budget_s, "sizes": [], "done": False,
        "image_emulated": any(type(f).__name__ == "ImageGuard" for f in sys.meta_path),
    }
    started = time.perf_counter()

    def update(row: dict[str, Any]) -> None:
        if not any(r is row for r in result["sizes"]):
            result["sizes"].append(row)
        result["wall_s"] = time.perf_counter() - started
        write_json(out, result)

    try:
        for gb in args.sizes:
            print(f"== checkpoint: {gb:g} GB ({budget.left():.0f}s left)", flush=True)
            try:
                row = bench_size(gb, args, device, root, budget, host_budget, update)
            except Exception as err:  # recorded: a code error here repeats at every size
                import traceback

                row = {"target_gb": gb, "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc().splitlines()[-12:]}
                update(row)
                print(f"== checkpoint: {gb:g} GB failed: {row['error']}", flush=True)
                break
            update(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("samples_s")}, default=str)[:1500],
                  flush=True)
        result["done"] = True
    finally:
        shutil.rmtree(root, ignore_errors=True)
        result["forbidden_imports"] = forbidden_imports()
        result["wall_s"] = time.perf_counter() - started
        write_json(out, result)
    return 0


# -------------------------------------------------------------------- train


def train_config(mode: str, device: str, run_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Overrides for harness.launch. GPU: a GPT big enough that a step is not all launch overhead, long
    enough that a SIGTERM lands mid-run. Rehearsal: the CPU-sized default. Dropout on, so a resume
    matches only if the (CUDA) RNG state came back with the checkpoint."""
    if mode == "gpu":
        shape = {"max_steps": 600, "interval": 50, "signal_after": 75}
        model = ["model.n_layer=4", "model.n_head=8", "model.n_embd=512", "data.block_size=128",
                 "train.global_batch_size=32"]
    else:
        shape = {"max_steps": 120, "interval": 20, "signal_after": 30}
        model = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "data.block_size=32",
                 "train.global_batch_size=8"]
    overrides = [
        f"run.dir={run_dir}", f"train.max_steps={shape['max_steps']}",
        f"checkpoint.interval_steps={shape['interval']}", "train.log_interval=1", "train.audit_samples=true",
        "model.dropout=0.1", f"train.device={'cuda' if device == 'cuda' else 'auto'}", "wandb.mode=disabled",
        "health.enabled=false", "preemption.metadata_watch=false", "launch.nproc_per_node=1",
        "launch.module=bench.gpu_worker", *model,
    ]
    return overrides, shape


def read_losses(path: Path, log: Path) -> tuple[dict[int, float], list[dict], str]:
    """{step: loss} from the worker's record (full precision), else from the log's progress lines."""
    losses: dict[int, float] = {}
    headers: list[dict] = []
    if path.exists():
        text = path.read_text()
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # the worker is still writing this line
            with contextlib.suppress(ValueError):
                if line.startswith("{"):
                    headers.append(json.loads(line))
                elif line.strip():
                    step, loss = line.split()
                    losses[int(step)] = float(loss)
        if losses:
            return losses, headers, "worker record (repr)"
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "step" and "/" in parts[1] and parts[2] == "loss":
                with contextlib.suppress(ValueError):
                    losses[int(parts[1].split("/")[0])] = float(parts[3])
    return losses, headers, "progress lines (4 decimals)"


def read_audit(run_dir: Path) -> list[tuple[int, int, int]]:
    rows = []
    for f in sorted((run_dir / "samples").glob("*.txt")):
        for line in f.read_text().splitlines():
            if line.strip():
                a, b, c = map(int, line.split())
                rows.append((a, b, c))
    return sorted(rows)


def log_digest(log: Path, n: int = 25) -> dict[str, Any]:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    warnings = list(dict.fromkeys(ln.strip() for ln in text if "Warning" in ln or "warn" in ln.lower()))
    return {"tail": text[-n:], "warnings": warnings[:20]}


def cmd_train(args: argparse.Namespace) -> int:
    """(2): an uninterrupted reference run and a run that gets SIGTERM after a periodic checkpoint (the two
    at once: they share the GPU, nothing else), then the resume of the second; all through harness.launch
    as `make train` runs it."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out)
    result: dict[str, Any] = {"part": "train", "mode": args.mode, "device": args.device, "ok": False, "checks": {}}
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(REPO)) if p)}

    from harness.launch import torchrun_has_shutdown_timeout  # noqa: PLC0415 - with the wheels on the path

    result["torchrun_accepts_shutdown_timeout"] = torchrun_has_shutdown_timeout()

    def launch(name: str, run_name: str) -> tuple[subprocess.Popen, Path, Path, Path]:
        run_dir = work / run_name
        overrides, shape = train_config(args.mode, args.device, run_dir)
        log, losses = work / f"{name}.log", work / f"{name}.losses"
        cmd = [sys.executable, "-m", "harness.launch", *overrides]
        extra = {"GPU_BENCH_LOSSES": str(losses)}
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env, **extra}, stdout=open(log, "ab"),  # noqa: SIM115
                                stderr=subprocess.STDOUT, start_new_session=True)
        result.setdefault("overrides", overrides)
        result["shape"] = shape
        return proc, run_dir, log, losses

    def wait(proc: subprocess.Popen, what: str) -> int | None:
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            result["checks"][f"{what}_timed_out"] = True
            return None

    t_start = time.perf_counter()
    ref, ref_dir, ref_log, ref_losses = launch("reference", "reference")
    pre, run_dir, pre_log, pre_losses = launch("preempted", "run")
    shape = result["shape"]
    store = run_dir / "checkpoints"
    signalled = None
    try:
        # SIGTERM the launcher (as `kill -TERM` on `make train`; systemd signals the whole unit) once a
        # periodic checkpoint is committed and training has gone past it
        while time.monotonic() < deadline and pre.poll() is None:
            steps, _, _ = read_losses(pre_losses, pre_log)
            if (store / f"step_{shape['interval']:09d}").is_dir() and steps and max(steps) >= shape["signal_after"]:
                signalled = max(steps)
                pre.send_signal(signal.SIGTERM)
                break
            time.sleep(0.005)
        result["signal_at_step_seen"] = signalled
        result["preempted_exit"] = wait(pre, "preempted")
        result["reference_exit"] = wait(ref, "reference")
        write_json(out, result)
        marker_path = run_dir / "PREEMPTED"
        marker = json.loads(marker_path.read_text()) if marker_path.exists() else None
        result["marker"] = marker
        t_resume = time.perf_counter()
        res, _, res_log, res_losses = launch("resumed", "run")
        result["resumed_exit"] = wait(res, "resumed")
        result["resume_wall_s"] = time.perf_counter() - t_resume
    finally:
        for p in (ref, pre):
            if p.poll() is None:
                kill_tree(p.pid)
    result["wall_s"] = time.perf_counter() - t_start

    ref_l, ref_h, source = read_losses(ref_losses, ref_log)
    pre_l, pre_h, _ = read_losses(pre_losses, pre_log)
    res_l, res_h, _ = read_losses(res_losses, res_log)
    result["loss_source"] = source
    result["workers"] = {"reference": ref_h, "preempted": pre_h, "resumed": res_h}
    summary_ref = json.loads((ref_dir / "summary.json").read_text()) if (ref_dir / "summary.json").exists() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    result["summary_reference"], result["summary_resumed"] = summary_ref, summary
    marker = result.get("marker") or {}
    saved = marker.get("step")
    first_after = min(res_l) if res_l else None
    checks = result["checks"]
    checks["preempted_exit_75"] = result.get("preempted_exit") == 75
    checks["reference_exit_0"] = result.get("reference_exit") == 0
    checks["resumed_exit_0"] = result.get("resumed_exit") == 0
    checks["emergency_save_ok"] = bool(marker.get("ok"))
    checks["periodic_checkpoint_before_signal"] = signalled is not None
    checks["resumed_from_saved_step"] = saved is not None and first_after == saved + 1
    checks["restarts_1"] = summary.get("restarts") == 1
    checks["final_step"] = summary.get("final_step") == shape["max_steps"]
    if saved is not None and first_after in ref_l and first_after in res_l:
        a, b = ref_l[first_after], res_l[first_after]
        result["first_step_after_resume"] = {"step": first_after, "loss_reference": a, "loss_resumed": b,
                                             "abs_diff": abs(a - b), "rel_diff": abs(a - b) / max(abs(a), 1e-12),
                                             "bit_equal": a == b}
        checks["same_loss_first_step_after_resume"] = abs(a - b) <= 1e-3 * max(abs(a), 1e-6)
    before = [s for s in pre_l if s in ref_l and (saved is None or s <= saved)]
    after = [s for s in res_l if s in ref_l]
    result["run_to_run_before_preemption"] = {
        "steps": len(before), "max_abs_diff": max((abs(pre_l[s] - ref_l[s]) for s in before), default=None),
        "bit_equal": all(pre_l[s] == ref_l[s] for s in before)}
    result["after_resume"] = {
        "steps": len(after), "max_abs_diff": max((abs(res_l[s] - ref_l[s]) for s in after), default=None),
        "bit_equal": all(res_l[s] == ref_l[s] for s in after)}
    result["final_sha256_equal"] = bool(summary) and summary.get("model_sha256") == summary_ref.get("model_sha256")
    audit_ref, audit_run = read_audit(ref_dir), read_audit(run_dir)
    result["sample_stream_equal"] = bool(audit_ref) and sorted(set(audit_run)) == audit_ref
    checks["sample_stream_equal"] = result["sample_stream_equal"]
    result["emergency_seconds"] = marker.get("seconds")
    result["logs"] = {name: log_digest(work / f"{name}.log") for name in ("reference", "preempted", "resumed")}
    result["expected"] = ("Expected on GPU: exit 75 with the marker, the resume starting at the saved step + 1, "
                          "the same sample stream, and the same loss at that step to float tolerance (1e-3 "
                          "relative); bit-equal losses and final weights are reported but not required (nccl, "
                          "bf16 kernels, atomics in attention backward). On CPU (gloo) the run is bit-exact.")
    result["ok"] = all(v is True for k, v in checks.items() if not k.endswith("_timed_out")) and not any(
        k.endswith("_timed_out") for k in checks)
    write_json(out, result)
    print(json.dumps({k: result.get(k) for k in ("ok", "checks", "marker", "first_step_after_resume",
                                                 "run_to_run_before_preemption", "after_resume",
                                                 "final_sha256_equal", "wall_s")}, indent=1, default=str))
    return 0 if result["ok"] else 1


# -------------------------------------------------------------------- merge


def mark(value: float | None, limit: float, what: str, size_gb: float | None, detail: str = "") -> dict[str, Any]:
    if value is None:
        return {"target": what, "size_gb": size_gb, "limit": limit, "value": None, "status": "not measured",
                "detail": detail}
    return {"target": what, "size_gb": size_gb, "limit": limit, "value": value,
            "status": "met" if value <= limit else "missed", "detail": detail}


def targets_of(checkpoint: dict[str, Any] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rows = [r for r in (checkpoint or {}).get("sizes", []) if "bytes" in r]
    for r in rows:
        gb = round(r["gb"], 2)
        b, e = r.get("b_pause_s"), r.get("e_floor_s")
        out.append(mark(b / e if b is not None and e else None, TARGETS["pause_over_floor"],
                        "pause <= 2x pinned floor", gb,
                        f"steady pause {b:.3f}s vs floor {e:.3f}s" if b is not None and e else ""))
        c, f = r.get("c_commit_s"), r.get("f_raw_write_s")
        out.append(mark(c / f if c is not None and f else None, TARGETS["durable_over_raw"],
                        "durable <= 1.2x raw write", gb,
                        f"commit {c:.2f}s vs raw write {f:.2f}s" if c is not None and f else ""))
    big = max(rows, key=lambda r: r["bytes"], default=None)
    what = "emergency save of ~18 GB well inside the 30 s notice"
    if big is None or big.get("emergency_s") is None:
        out.append(mark(None, TARGETS["emergency_s"], what, None))
    elif big["gb"] < 9.0:  # too far from 18 GB to extrapolate (fixed costs dominate small states)
        out.append(mark(None, TARGETS["emergency_s"], what, round(big["gb"], 2),
                        f"largest state run was {big['gb']:.2f} GB: save_now took {big['emergency_s']:.2f}s "
                        f"({big.get('emergency_behind_inflight_s') or float('nan'):.2f}s behind an in-flight save)"))
    else:
        value, detail = big["emergency_s"], f"save_now of {big['gb']:.1f} GB, buffers warm"
        if big["gb"] < 17.0:
            value = value * 18.0 / big["gb"]
            detail += f"; extrapolated linearly to 18 GB from {big['emergency_s']:.2f}s (largest size run)"
        if big.get("emergency_behind_inflight_s") is not None:
            detail += f"; behind an in-flight periodic save: {big['emergency_behind_inflight_s']:.2f}s"
        detail += f"; first save with cold buffers took {big.get('c_first_commit_s', float('nan')):.2f}s to commit"
        out.append(mark(value, TARGETS["emergency_s"], what, round(big["gb"], 2),
                        detail + f" (limit: preemption.deadline_s, {NOTICE_S:.0f} s notice)"))
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    parts_dir = Path(args.parts_dir)
    parts: dict[str, Any] = {}
    for name in ("env", "train", "checkpoint"):
        path = parts_dir / f"{name}.json"
        if path.exists():
            try:
                parts[name] = json.loads(path.read_text())
            except ValueError as err:
                parts[name] = {"error": f"unreadable: {err}"}
    status = dict(s.split("=", 1) for s in args.status)
    git: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            git = {"commit": head.stdout.strip(), "modified_files": len(dirty.stdout.splitlines())}
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "issue": 18,
        "mode": args.mode,
        "created_unix": time.time(),
        "wall_s": args.wall_s,
        "git": git,
        "status": status,
        "machine": parts.get("env") or {"note": "env part missing"},
        "targets": targets_of(parts.get("checkpoint")),
        "train": parts.get("train"),
        "checkpoint": parts.get("checkpoint"),
        "notes": [
            "GB = 1e9 bytes of state tensors (fp32 params + AdamW exp_avg, exp_avg_sq); the state lives on the "
            "device. pause = CheckpointManager.save() blocking time (best steady save after the first, which "
            "allocates the reused pinned buffers: b_first_pause_s); floor = D2H copy into pinned buffers "
            "allocated once (best of 3); durable = save() call to the commit report (DCP write + fsync + "
            "CRC32C + manifest + rename); raw write = the same bytes from N threads, one file each, + fsync.",
            "DCP peers: pause_s = until the optimizer may step again (the call for default; the staging future "
            "for the pinned DefaultStager, whose call returns at once); durable_s = the upload future.",
            "Restore reads files still in the page cache. Emergency = save_now of a new step, buffers warm; "
            "behind_inflight = save() then save_now() of the next step at once (the worst case).",
        ],
    }
    if args.mode == "rehearse":
        result["notes"].insert(0, "REHEARSAL on a CPU machine with small stand-in sizes and gloo: this proves the "
                                  "script and its import graph, not the GPU targets (defined on a GPU).")
    write_json(Path(args.out), result)
    print_summary(result)
    return 0


def print_summary(result: dict[str, Any]) -> None:
    m = result.get("machine") or {}
    driver = (m.get("nvidia_smi") or {}).get("driver_version")
    print(f"\n== {result['mode']}: {m.get('device_name') or m.get('cpu')}, torch {m.get('torch')}, CUDA "
          f"{m.get('torch_cuda')}, driver {driver}; status {result['status']}")
    ck = result.get("checkpoint") or {}
    cols = ("gb", "b_first_pause_s", "b_pause_s", "e_floor_s", "c_commit_s", "f_raw_write_s", "d_restore_s",
            "emergency_s", "emergency_behind_inflight_s", "a_torch_save_s")
    print("  " + " ".join(f"{c:>13.13}" for c in cols) + "  dcp default / pinned: pause, durable")
    for r in ck.get("sizes", []):
        if "bytes" not in r:
            print(f"  {r.get('target_gb')} GB: {r.get('skipped')}")
            continue
        cells = [f"{r[c]:13.3f}" if isinstance(r.get(c), float) else f"{'-':>13}" for c in cols]
        peers = []
        for kind in ("dcp_default", "dcp_pinned"):
            calls = (r.get(kind) or {}).get("calls") or []
            peers.append(", ".join(f"{c['pause_s']:.2f}/{c['durable_s']:.2f}" if "error" not in c
                                   else c["error"][:60] for c in calls) or "-")
        print("  " + " ".join(cells) + "  " + " | ".join(peers))
        for note in r.get("notes", []):
            print(f"      note: {note}")
    for t in result.get("targets", []):
        value = f"{t['value']:.3f}" if t["value"] is not None else "-"
        print(f"  target {t['target']:<55} {t['size_gb']!s:>6} GB: {value:>8} (limit {t['limit']}) "
              f"{t['status'].upper()} {t['detail']}")
    tr = result.get("train") or {}
    if tr:
        print(f"  train: ok={tr.get('ok')} marker={tr.get('marker')} first step after resume="
              f"{tr.get('first_step_after_resume')} final sha equal={tr.get('final_sha256_equal')}")
        failed = [k for k, v in (tr.get("checks") or {}).items() if v is not True]
        if failed:
            print(f"  train checks failed: {failed}")


# -------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("env", "checkpoint", "train", "merge"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--mode", choices=["gpu", "rehearse"], default="gpu")
        if name != "merge":
            p.add_argument("--device", choices=["cuda", "cpu", "auto"], default="auto")
            p.add_argument("--budget-s", type=float, default=400.0)
    ck = sub.choices["checkpoint"]
    ck.add_argument("--sizes", type=float, nargs="+", default=[1.0, 6.0, 18.0])
    ck.add_argument("--dir", default=None, help="scratch directory on the disk to measure")
    ck.add_argument("--width", type=int, default=None, help="nn.Linear width (default 4096 on GPU, 1024 on CPU)")
    ck.add_argument("--threads", type=int, default=8, help="engine write_threads and raw-write threads")
    ck.add_argument("--repeats", type=int, default=2, help="steady saves below 10 GB (one above)")
    ck.add_argument("--host-mem-gb", type=float, default=None,
                    help="host memory to plan with when MemAvailable under-reports (a VM that grows)")
    tr = sub.choices["train"]
    tr.add_argument("--work", required=True)
    mg = sub.choices["merge"]
    mg.add_argument("--parts-dir", required=True)
    mg.add_argument("--status", nargs="*", default=[])
    mg.add_argument("--wall-s", type=float, default=None)
    args = parser.parse_args(argv)
    return {"env": cmd_env, "checkpoint": cmd_checkpoint, "train": cmd_train, "merge": cmd_merge}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
