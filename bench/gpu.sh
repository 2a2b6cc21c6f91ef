#!/usr/bin/env bash
# bench/gpu.sh: the one command of issue 18, for a lent GPU machine (one NVIDIA GPU, torch 2.11 in its
# own python3, no package index). It runs, under a total time guard (default 470 s, so < 8 minutes):
#   env         the machine: GPU model, driver, CUDA, torch, nccl; the torch API differences that matter
#   train       (2) a short bf16 run of our GPT through `python -m harness.launch` (torchrun, nccl, world
#               size 1, dropout on so the CUDA RNG state matters): a periodic checkpoint, SIGTERM, the
#               emergency save, exit 75, resume; compared step by step with an uninterrupted run
#   checkpoint  (1) + (3) the checkpoint benchmark at 1, 6 and 18 GB of GPU state (fp32 params + AdamW
#               moments): the engine's first and steady pause, time to durable, restore, the pinned-copy
#               floor, a raw threaded write, the emergency save_now, and the peers torch.save + fsync, DCP
#               async_save (default) and DCP async_save with its pinned DefaultStager
# and writes bench/results/gpu.json (or gpu-rehearsal.json) with each target marked met or missed.
# Each part runs in its own process under `timeout`, writing its JSON as it goes, so a hang or a kill
# loses only that part's remainder.
#
# Usage:
#   bench/gpu.sh --fetch-wheels   # here, on the CPU machine (needs the package index): fills bench/.gpu-wheels
#   bench/gpu.sh                  # on the GPU machine: all parts, results in bench/results/gpu.json
#   bench/gpu.sh --rehearse       # here, on CPU: small sizes, gloo, the GPU image's missing packages blocked
#   options: --parts "env train checkpoint"  --sizes "1 6 18"  --budget SECONDS  --out FILE
#   env: PYTHON (interpreter), GPU_BENCH_DIR (scratch on the disk to measure), GPU_BENCH_HOST_MEM_GB,
#        GPU_BENCH_LAUNCH=auto|launcher|torchrun (auto: torchrun directly when it rejects the launcher's
#        --shutdown-timeout, as torch 2.11's does)
#
# From a session with a lent machine (the device tool; ignored folders travel only when carried):
#   run(command="bash bench/gpu.sh", carry=["bench/.gpu-wheels"], timeout_s=540)
# The JSON and logs also land in $OUT when it is set: copy $OUT/gpu.json to bench/results/gpu.json.
# A rerun of one part fits the rest of the 15 minutes: --parts "env train" or --sizes "18" --budget 300.
#
# Why wheels, and which: the GPU image has torch, numpy, rich, PyYAML and packaging, but not hydra-core,
# omegaconf, google-crc32c or googleapis-common-protos. The benchmark part imports only the engine
# (harness.checkpoint.*, harness.state, harness.distributed), no hydra/omegaconf/wandb: it needs only
# google-crc32c (the manifest's CRC32C; its pure-Python fallback would take minutes per GB). The training
# part runs the real trainer, `harness.launch` -> torchrun -> `harness.train`, because the point is to
# run *that* code on a GPU (nccl, bf16 autocast, pinned snapshots, CUDA RNG, the SIGTERM path), not a
# copy of it; it needs hydra-core, omegaconf and antlr4-python3-runtime (Hydra's parser), and
# googleapis-common-protos + protobuf (harness.telemetry imports the Monitoring sink's metric protos;
# protobuf is shipped too, in the lock's version, because those protos need a recent runtime). All are
# small (about 1.1 MB in all), installed with `pip install --no-index --no-deps --target` into a temp
# directory put first on PYTHONPATH, so nothing on the machine changes. wandb is not needed: the runs
# use wandb.mode=disabled, which never imports it. The versions are those of requirements.txt / .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS=bench/.gpu-wheels
# name==version of every shipped wheel; the versions the lock resolves (requirements.txt, .venv)
pin() {  # pin NAME FALLBACK_VERSION: the version requirements.txt pins, else the fallback
    local line
    line=$(grep -i -m1 "^$1==" requirements.txt || true)
    echo "${line:-$1==$2}"
}
PINS=("$(pin hydra-core 1.3.8)" "$(pin omegaconf 2.3.1)" "antlr4-python3-runtime==4.9.3"
      "$(pin googleapis-common-protos 1.76.0)" "$(pin protobuf 7.36.2)" "google-crc32c==1.9.0")

fetch_wheels() {
    local py=${PYTHON:-.venv/bin/python}
    [[ -x $py ]] || py=python3
    mkdir -p "$WHEELS"
    local binary=() name
    for name in "${PINS[@]}"; do
        [[ $name == antlr4-python3-runtime* ]] || binary+=("$name")
    done
    # for the GPU machine's python3 (CPython 3.12, x86-64 manylinux)
    "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${binary[@]}"
    # for this machine's interpreter, so that --rehearse installs the same set the same way
    "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$WHEELS" "${binary[@]}"
    # antlr4-python3-runtime 4.9.3 is published as an sdist only: build its pure-Python wheel here
    "$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
    ls -l "$WHEELS"
} 2> >(grep -v "is ignored: it is neither" >&2)

MODE=gpu
PARTS="env train checkpoint"
SIZES="1 6 18"
BUDGET=470
OUTFILE=""
while (($#)); do
    case $1 in
        --fetch-wheels) fetch_wheels; exit 0 ;;
        --rehearse) MODE=rehearse ;;
        --parts) PARTS=$2; shift ;;
        --sizes) SIZES=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --out) OUTFILE=$2; shift ;;
        -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $MODE == rehearse ]]; then
    PY=${PYTHON:-.venv/bin/python}
    [[ -x $PY ]] || PY=python3
    [[ $SIZES == "1 6 18" ]] && SIZES="0.05 0.1 0.3"  # stand-ins for 1, 6 and 18 GB
    DEVICE=cpu
    OUTFILE=${OUTFILE:-bench/results/gpu-rehearsal.json}
else
    PY=${PYTHON:-python3}
    DEVICE=cuda
    OUTFILE=${OUTFILE:-bench/results/gpu.json}
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/parts" "$WORK/site"
LOG="$WORK/gpu.log"
exec > >(tee "$LOG") 2>&1
echo "bench/gpu.sh: mode $MODE, parts '$PARTS', sizes '$SIZES', budget ${BUDGET}s, python $PY, work $WORK"

cleanup_scratch() {  # what a killed checkpoint part leaves behind (its scratch folders), nothing else
    local d
    for d in "${GPU_BENCH_DIR:-}" "${TMPDIR:-/tmp}" "$PWD/.gpu-scratch"; do
        [[ -n $d && -d $d ]] && rm -rf "$d"/gpu-bench-ckpt-*
    done
    return 0
}
cleanup_scratch

STATUS=()  # part=exit code, for the merge
left() { echo $((BUDGET - SECONDS)); }

# The wheels: into a temp target first on PYTHONPATH (nothing on the machine is modified).
WHEELS_OK=0
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --find-links "$WHEELS" --target "$WORK/site" "${PINS[@]}"; then
        WHEELS_OK=1
    else
        echo "bench/gpu.sh: installing the wheels from $WHEELS failed" >&2
    fi
else
    echo "bench/gpu.sh: no wheels in $WHEELS (run bench/gpu.sh --fetch-wheels on the CPU machine and carry" \
        "bench/.gpu-wheels); parts that need them are skipped" >&2
fi
STATUS+=("wheels=$((1 - WHEELS_OK))")
PYPATH="$WORK/site:$PWD"
if [[ $MODE == rehearse ]]; then
    # Emulate the GPU image: imports of packages it lacks fail unless they come from the shipped wheels.
    mkdir -p "$WORK/image"
    "$PY" -m bench.gpu_image write-sitecustomize "$WORK/image" --allow-root "$WORK/site"
    PYPATH="$WORK/image:$PYPATH"
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPU_BENCH_DIR=${GPU_BENCH_DIR:-}

part() {  # part NAME SECONDS ARGS...: one part in its own process, killed at its time guard
    local name=$1 seconds=$2 rc=0
    shift 2
    if ((seconds < 20)); then
        echo "== $name: skipped, ${seconds}s left of the ${BUDGET}s budget"
        STATUS+=("$name=skipped")
        return
    fi
    echo "== $name (time guard ${seconds}s, $(left)s of the budget left)"
    timeout --kill-after=10 "$seconds" "$PY" -m bench.gpu "$name" --out "$WORK/parts/$name.json" \
        --budget-s "$((seconds - 10))" "$@" || rc=$?
    echo "== $name: exit $rc after ${SECONDS}s in all"
    STATUS+=("$name=$rc")
}

for p in $PARTS; do
    case $p in
        env) part env "$(( $(left) < 60 ? $(left) - 20 : 60 ))" --device "$DEVICE" ;;
        train)
            if ((WHEELS_OK)); then
                # leave the checkpoint part at least 240 s when it follows
                t=$(( $(left) - 30 ))
                [[ " $PARTS " == *" checkpoint "* ]] && t=$(( t - 240 ))
                part train "$(( t > 150 ? 150 : t ))" --device "$DEVICE" --work "$WORK/train" --mode "$MODE" \
                    --launch "${GPU_BENCH_LAUNCH:-auto}"
            else
                STATUS+=("train=no-wheels")
            fi ;;
        checkpoint)
            # shellcheck disable=SC2086 # SIZES is a list of numbers
            part checkpoint "$(( $(left) - 20 ))" --device "$DEVICE" --sizes $SIZES --mode "$MODE" \
                ${GPU_BENCH_HOST_MEM_GB:+--host-mem-gb "$GPU_BENCH_HOST_MEM_GB"}
            cleanup_scratch ;;
        *) echo "bench/gpu.sh: unknown part $p" >&2; STATUS+=("$p=unknown") ;;
    esac
done

"$PY" -m bench.gpu merge --mode "$MODE" --parts-dir "$WORK/parts" --out "$OUTFILE" --wall-s "$SECONDS" \
    --status "${STATUS[@]}"
echo "bench/gpu.sh: wrote $OUTFILE after ${SECONDS}s"
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
    cp "$OUTFILE" "$OUT/$(basename "$OUTFILE")"
    for f in "$WORK"/train/*.log; do
        if [[ -e $f ]]; then cp "$f" "$OUT/train-$(basename "$f")"; fi
    done
    cp "$LOG" "$OUT/gpu.log"
fi
