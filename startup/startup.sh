#!/usr/bin/env bash
# What a Spot training VM runs at every boot (the GCE startup-script).
#
# Reads its job from instance metadata, prepares the local SSDs (RAID-0 when there are several) and,
# on the master, the persistent disk that holds checkpoints; waits for the release's manifest in the
# bucket, downloads the release, checks every file's sha256 and installs it from its wheelhouse (no
# package index) into a fresh directory; runs a preflight (Python, torch, GPUs); writes the W&B key
# into a root-only env file; writes and starts one systemd unit:
#   master, worker: spot-train.service       -> python -m harness.launch <overrides>
#   coordinator:    spot-rendezvous.service  -> python -m harness.rendezvous --port <port> --run-id <run id>
# Hands the Ops Agent its config from the metadata (installing the agent from the release when the
# image has none), so the job's journal reaches Cloud Logging with the run's labels (infra/logs.py);
# logging never stops a boot.
# Safe to run again after a reboot or on a recreated VM: nothing that exists is made twice, and a
# persistent disk that has a filesystem is never formatted.
#
# Every external effect goes through curl, mdadm, mkfs.ext4, blkid, mount, mountpoint, systemctl,
# gcloud, python3, sha256sum and dpkg, and every file written lies under $SPOT_ROOT, so it runs unprivileged
# against stubs (tests, the local Spot cloud). startup/README.md lists the environment it honours.
set -euo pipefail
shopt -s inherit_errexit

readonly ROOT=${SPOT_ROOT:-}
readonly MD_BASE="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1"
readonly SSD_GLOB=${SPOT_LOCAL_SSD_GLOB:-/dev/disk/by-id/google-local-nvme-ssd-*}
readonly DEVICE_WAIT_S=${SPOT_DEVICE_WAIT_S:-60}
readonly RELEASE_WAIT_S=${SPOT_RELEASE_WAIT_S:-1800}
readonly RELEASE_POLL_S=${SPOT_RELEASE_POLL_S:-5}
readonly CONSOLE=${SPOT_CONSOLE:-/dev/ttyS0}
readonly UNIT_DIR="$ROOT/etc/systemd/system"
readonly ETC_DIR="$ROOT/etc/spot"
readonly OPT_DIR="$ROOT/opt/spot"
readonly ENV_FILE="$ETC_DIR/spot-train.env"
readonly MARKER_PATH_FILE="$ETC_DIR/marker-path"
readonly RAID_DEVICE=/dev/md0
readonly TRAIN_UNIT=spot-train.service
readonly RDZV_UNIT=spot-rendezvous.service
readonly PREFLIGHT_UNIT=spot-preflight.service
readonly PREEMPTED_EXIT=75
readonly AGENT_CONFIG="$ROOT/etc/google-cloud-ops-agent/config.yaml"
readonly AGENT_ENGINE="$ROOT/opt/google-cloud-ops-agent/libexec/google_cloud_ops_agent_engine"
readonly AGENT_UNITS="google-cloud-ops-agent.service google-cloud-ops-agent-fluent-bit.service google-cloud-ops-agent-opentelemetry-collector.service"
readonly SHUTDOWN_SCRIPTS_UNIT=google-shutdown-scripts.service
readonly LOGS_DROPIN=spot-logs.conf
# Characters a path may hold to appear unquoted in a unit file (no whitespace, quotes, $ or %).
readonly PLAIN_PATH='[A-Za-z0-9_@+=:,./-]*'

log() { printf '%(%Y-%m-%dT%H:%M:%S%z)T spot-startup: %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# --- metadata -------------------------------------------------------------------------------------

# metadata PATH: print the value under computeMetadata/v1/PATH; return 3 when it is absent (404).
metadata() {
    local out code
    out=$(curl -sS --noproxy '*' --retry 5 --retry-connrefused --retry-delay 1 --max-time 10 \
        -H 'Metadata-Flavor: Google' -w '\n%{http_code}' "$MD_BASE/$1") ||
        die "metadata server unreachable: $MD_BASE/$1"
    code=${out##*$'\n'}
    case $code in
    200) printf '%s' "${out%$'\n'*}" ;;
    404) return 3 ;;
    *) die "metadata $1: HTTP $code" ;;
    esac
}

# attr KEY: a required instance attribute (dies naming KEY when absent or empty).
# attr KEY DEFAULT: an optional one.
attr() {
    local value="" rc=0
    value=$(metadata "instance/attributes/$1") || rc=$?
    if ((rc != 0 && rc != 3)); then exit "$rc"; fi
    if [[ -z $value ]]; then
        (($# > 1)) || die "required metadata key $1 is missing (instance attribute '$1')"
        value=$2
    fi
    printf '%s' "$value"
}

# check KEY VALUE REGEX WHAT: die naming KEY unless VALUE matches.
check() {
    [[ $2 =~ $3 ]] || die "metadata key $1='$2' is not valid: expected $4"
}

read_role() {
    ROLE=$(attr spot-role)
    check spot-role "$ROLE" '^(master|worker|coordinator)$' "master, worker or coordinator"
    RDZV_ENDPOINT=$(attr spot-rdzv-endpoint)
    check spot-rdzv-endpoint "$RDZV_ENDPOINT" '^[^[:space:]]+:[0-9]+$' "host:port"
}

# Needed to install a release, and by the trainer for its bucket tier.
read_release() {
    BUCKET=$(attr spot-bucket)
    check spot-bucket "$BUCKET" '^[a-z0-9][a-z0-9._-]*$' "a bucket name (no gs://)"
    if [[ -z ${SPOT_HARNESS_PYTHON:-} ]]; then
        RELEASE=$(attr spot-release)
        check spot-release "$RELEASE" '^[A-Za-z0-9._+-]+$' "a release version"
    fi
}

# What the preflight expects: the image's Python (empty: any) and the machine type's GPU count (0:
# no GPU check, as on a CPU coordinator or the local Spot cloud).
read_preflight() {
    PYTHON_EXPECTED=$(attr spot-python "")
    [[ -z $PYTHON_EXPECTED ]] || check spot-python "$PYTHON_EXPECTED" '^[0-9]+\.[0-9]+$' "major.minor, e.g. 3.12"
    GPU_COUNT=$(attr spot-gpu-count 0)
    check spot-gpu-count "$GPU_COUNT" '^[0-9]+$' "a GPU count"
}

read_training_job() {
    RUN_ID=$(attr spot-run-id)
    check spot-run-id "$RUN_ID" '^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$' \
        "letters, digits, '.', '_', '-', at most one '/' between two such names (a sweep's <sweep>/<job>)"
    NNODES=$(attr spot-nnodes)
    check spot-nnodes "$NNODES" '^[0-9]+(:[0-9]+)?$' "N or MIN:MAX"
    NPROC=$(attr spot-nproc-per-node)
    check spot-nproc-per-node "$NPROC" '^[0-9]+$' "a positive integer"
    HEALTH_PORT=$(attr spot-health-port 8888)
    check spot-health-port "$HEALTH_PORT" '^[0-9]+$' "a port number"
    SSD_MOUNT=$(attr spot-local-ssd-mount /mnt/localssd)
    check spot-local-ssd-mount "$SSD_MOUNT" "^/$PLAIN_PATH\$" "an absolute path of plain characters"
    PD_MOUNT=$(attr spot-pd-mount /mnt/pd)
    check spot-pd-mount "$PD_MOUNT" "^/$PLAIN_PATH\$" "an absolute path of plain characters"
    PD_DEVICE=$(attr spot-pd-device /dev/disk/by-id/google-checkpoint-pd)
    WANDB_SECRET=$(attr spot-wandb-secret "")
    local overrides
    overrides=$(attr spot-hydra-overrides "")
    read -r -d '' -a USER_OVERRIDES <<<"$overrides" || true
    RUN_DIR="$ROOT$SSD_MOUNT/runs/$RUN_ID"
}

# --- disks ----------------------------------------------------------------------------------------

# has_signature DEV: 0 when blkid finds a filesystem (or any other signature) on DEV, 1 when the
# device is blank. Any other answer stops the script: a disk whose contents are unknown is never
# formatted.
has_signature() {
    local rc=0
    blkid -p "$1" >/dev/null 2>&1 || rc=$?
    case $rc in
    0) return 0 ;;
    2) return 1 ;;
    *) die "blkid -p $1 exited $rc: contents unknown, refusing to format it" ;;
    esac
}

make_filesystem() {
    log "formatting $1 (ext4)"
    mkfs.ext4 -F -q -m 0 -E lazy_itable_init=0,lazy_journal_init=0,discard "$1"
}

mount_device() {
    log "mounting $1 at $2"
    mount -o discard,defaults "$1" "$2"
}

wait_for_device() {
    local waited=0
    until [[ -e $1 ]]; do
        ((waited < DEVICE_WAIT_S)) || die "device $1 did not appear within ${DEVICE_WAIT_S}s: is the disk attached?"
        sleep 1
        waited=$((waited + 1))
    done
}

local_ssds() {
    compgen -G "$SSD_GLOB" | sort -V || true
}

# raid_over DEV...: make RAID_DEVICE a RAID-0 over DEVs: keep it when assembled, reassemble it after
# a reboot, create it on fresh (recreated) SSDs. After a reboot the kernel may have assembled the
# array under another name (/dev/md127): stopping unused arrays frees the SSDs to assemble as md0.
raid_over() {
    command -v mdadm >/dev/null || die "$# local SSDs but no mdadm: use an image that has it"
    if mdadm --detail "$RAID_DEVICE" >/dev/null 2>&1; then
        log "$RAID_DEVICE is already assembled"
        return
    fi
    mdadm --stop --scan >/dev/null 2>&1 || true
    if mdadm --assemble "$RAID_DEVICE" "$@" >/dev/null 2>&1; then
        log "reassembled $RAID_DEVICE from $*"
    else
        log "creating RAID-0 $RAID_DEVICE over $# local SSDs"
        mdadm --create "$RAID_DEVICE" --level=0 --raid-devices="$#" --run "$@" </dev/null
    fi
}

prepare_local_ssd() {
    local target="$ROOT$SSD_MOUNT" device
    local -a ssds
    mkdir -p "$target"
    if mountpoint -q "$target"; then
        log "$target is already mounted"
        return
    fi
    mapfile -t ssds < <(local_ssds)
    case ${#ssds[@]} in
    0)
        log "no local SSD matches $SSD_GLOB: $target stays on the boot disk"
        return
        ;;
    1) device=${ssds[0]} ;;
    *)
        raid_over "${ssds[@]}"
        device=$RAID_DEVICE
        ;;
    esac
    # Local SSDs come back blank on a recreated VM: format them whenever they hold nothing.
    has_signature "$device" || make_filesystem "$device"
    mount_device "$device" "$target"
}

prepare_persistent_disk() {
    local target="$ROOT$PD_MOUNT"
    mkdir -p "$target"
    if mountpoint -q "$target"; then
        log "$target is already mounted"
        return
    fi
    wait_for_device "$PD_DEVICE"
    if has_signature "$PD_DEVICE"; then
        log "$PD_DEVICE has a filesystem: keeping it (it holds checkpoints)"
    else
        log "$PD_DEVICE is blank: first use"
        make_filesystem "$PD_DEVICE"
    fi
    mount_device "$PD_DEVICE" "$target"
}

# --- release --------------------------------------------------------------------------------------

# Sets HARNESS_PYTHON and CONF_DIR: SPOT_HARNESS_PYTHON as given (no conf), or the release's venv.
# A release is installed into releases/<version>/ and marked .installed last; one found without the
# mark (an earlier boot died half-way) is removed and installed again. The switch to a new release
# is the unit file, rewritten atomically to point at it once it is complete.
install_release() {
    CONF_DIR=""
    RELEASE_DIR=""
    if [[ -n ${SPOT_HARNESS_PYTHON:-} ]]; then
        HARNESS_PYTHON=$SPOT_HARNESS_PYTHON
        [[ $HARNESS_PYTHON == /* ]] || HARNESS_PYTHON=$(command -v "$HARNESS_PYTHON") ||
            die "SPOT_HARNESS_PYTHON=$SPOT_HARNESS_PYTHON is not an absolute path nor on PATH"
        log "SPOT_HARNESS_PYTHON set: using $HARNESS_PYTHON, not installing a release"
        return
    fi
    local release_dir="$OPT_DIR/releases/$RELEASE"
    RELEASE_DIR=$release_dir
    HARNESS_PYTHON="$release_dir/venv/bin/python"
    CONF_DIR="$release_dir/conf"
    if [[ -f $release_dir/.installed ]]; then
        log "release $RELEASE is already installed"
    else
        rm -rf "$release_dir"
        mkdir -p "$release_dir"
        wait_for_manifest "$release_dir/manifest.json"
        download_release "$release_dir"
        install_wheels "$release_dir"
        touch "$release_dir/.installed"
        log "installed release $RELEASE"
    fi
    remove_other_releases
}

# wait_for_manifest DEST: make deploy publishes manifest.json last, so its presence says the release
# is complete. Poll with backoff (RELEASE_POLL_S doubling up to 60 s) for up to RELEASE_WAIT_S.
wait_for_manifest() {
    local url="gs://$BUCKET/releases/$RELEASE/manifest.json" delay=$RELEASE_POLL_S waited=0
    until gcloud storage cp "$url" "$1" 2>/dev/null; do
        ((waited < RELEASE_WAIT_S)) ||
            die "release $RELEASE is not published: no $url after ${RELEASE_WAIT_S}s (did make deploy finish?)"
        log "waiting for $url (make deploy publishes it); next try in ${delay}s"
        sleep "$delay"
        waited=$((waited + delay))
        delay=$((delay * 2 > 60 ? 60 : delay * 2))
    done
}

# manifest_files MANIFEST: one line per file: "<sha256> <object> <path>".
manifest_files() {
    python3 - "$1" <<'PY'
import json
import sys

for path, entry in sorted(json.load(open(sys.argv[1]))["files"].items()):
    print(entry["sha256"], entry["object"], path)
PY
}

# download_release DIR: every file the manifest lists, then every sha256 checked. The wheels and the
# Ops Agent package are shared by all releases (wheels/, agents/ in the bucket): copied one by one.
download_release() {
    local sha object path sums="" n=0 failed
    local -a wheels=() agents=()
    log "downloading release $RELEASE from gs://$BUCKET"
    while read -r sha object path; do
        [[ $sha =~ ^[0-9a-f]{64}$ && $path =~ ^[A-Za-z0-9._+/~-]+$ && $path != *..* ]] ||
            die "gs://$BUCKET/releases/$RELEASE/manifest.json lists a malformed entry: $sha $object $path"
        if [[ $path == wheels/* ]]; then wheels+=("gs://$BUCKET/$object"); fi
        if [[ $path == agents/* ]]; then agents+=("gs://$BUCKET/$object"); fi
        sums+="$sha  $path"$'\n'
        n=$((n + 1))
    done < <(manifest_files "$1/manifest.json")
    ((n > 0)) || die "gs://$BUCKET/releases/$RELEASE/manifest.json lists no files"
    gcloud storage cp --recursive "gs://$BUCKET/releases/$RELEASE/*" "$1/"
    if ((${#wheels[@]})); then
        mkdir -p "$1/wheels"
        gcloud storage cp "${wheels[@]}" "$1/wheels/"
    fi
    if ((${#agents[@]})); then
        mkdir -p "$1/agents"
        gcloud storage cp "${agents[@]}" "$1/agents/"
    fi
    failed=$(cd "$1" && sha256sum --check --quiet --strict 2>&1 <<<"${sums%$'\n'}") ||
        die "release $RELEASE failed its sha256 check, not installed: ${failed//$'\n'/; }"
    [[ -d $1/conf ]] || die "gs://$BUCKET/releases/$RELEASE has no conf/ folder"
    log "downloaded $n files of release $RELEASE, every sha256 matches its manifest"
}

# install_wheels RELEASE_DIR: a venv from the release's wheelhouse alone (no package index). pip
# itself comes from the wheelhouse (the image's python3 may lack ensurepip); the venv sees the
# image's packages, for images that bring torch.
install_wheels() {
    local -a wheels pips pip
    mapfile -t wheels < <(compgen -G "$1/spot_harness-*-py3-none-any.whl" || true)
    ((${#wheels[@]} == 1)) || die "expected one spot_harness wheel in gs://$BUCKET/releases/$RELEASE, found ${#wheels[@]}"
    mapfile -t pips < <(compgen -G "$1/wheels/pip-*.whl" || true)
    ((${#pips[@]} == 1)) || die "expected one pip wheel in the wheelhouse of release $RELEASE, found ${#pips[@]}"
    python3 -m venv --system-site-packages --without-pip "$1/venv"
    pip=("$1/venv/bin/python" "${pips[0]}/pip" install --quiet --disable-pip-version-check --no-input
        --no-index --find-links "$1/wheels")
    "${pip[@]}" -r "$1/requirements.txt"
    "${pip[@]}" --no-deps "${wheels[0]}"
    log "installed ${wheels[0]##*/} and its wheelhouse into $1/venv"
}

remove_other_releases() {
    local dir
    for dir in "$OPT_DIR"/releases/*; do
        if [[ -d $dir && $dir != "$OPT_DIR/releases/$RELEASE" ]]; then
            rm -rf "$dir"
            log "removed release ${dir##*/}"
        fi
    done
}

# --- preflight ------------------------------------------------------------------------------------

# preflight: the harness's Python is the one the release was built for, imports torch, and sees the
# machine type's GPUs. On failure: one line to the serial console and the guest log, 503 with the
# reason on the health port (trainers), and exit 1 without starting the job (no restart loop).
preflight() {
    local out rc=0
    out=$("$HARNESS_PYTHON" - "$PYTHON_EXPECTED" "$GPU_COUNT" 2>&1 <<'PY'
import sys

want, gpus = sys.argv[1], int(sys.argv[2])
have = "%d.%d" % sys.version_info[:2]
if want and have != want:
    sys.exit(f"Python {have} at {sys.executable}, but the release is built for {want} (infra.image.python)")
try:
    import torch
except Exception as err:  # noqa: BLE001 - any failure to import is the reason to report
    sys.exit(f"import torch failed: {err!r}")
if gpus and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device, the machine type has {gpus} GPU(s)")
if gpus and torch.cuda.device_count() != gpus:
    sys.exit(f"torch sees {torch.cuda.device_count()} GPU(s), the machine type has {gpus}")
print(f"Python {have}, torch {torch.__version__}, {gpus} GPU(s)")
PY
    ) || rc=$?
    if ((rc == 0)); then
        log "preflight: ${out##*$'\n'}"
        return
    fi
    preflight_failed "${out##*$'\n'}"
}

preflight_failed() {
    local unit
    printf 'spot-startup: preflight failed: %s\n' "$1" >>"$CONSOLE" 2>/dev/null || true
    log "ERROR: preflight failed: $1"
    if [[ $ROLE != coordinator ]]; then
        mkdir -p "$ETC_DIR" "$OPT_DIR"
        printf '%s\n' "$1" >"$ETC_DIR/preflight-failed"
        unit=$(preflight_unit)
        install_unit "$PREFLIGHT_UNIT" "$unit"
        start_unit "$PREFLIGHT_UNIT"
    fi
    exit 1
}

# Answers every request on the health port with 503 and the preflight's reason, so autohealing and
# whoever looks at the instance group see why this VM does not train.
preflight_unit() {
    local python exec_start
    python=$(command -v python3) || die "no python3 on this image"
    cat >"$OPT_DIR/preflight-failed.py" <<'PY'
import http.server
import sys

body = f"preflight failed: {open(sys.argv[2]).read().strip()}\n".encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("", int(sys.argv[1])), Handler).serve_forever()
PY
    exec_start=$(exec_line "$python" "$OPT_DIR/preflight-failed.py" "$HEALTH_PORT" "$ETC_DIR/preflight-failed")
    cat <<EOF
# Written by startup.sh when the preflight failed: serves 503 and the reason on the health port.
[Unit]
Description=Spot preflight failed: 503 on port $HEALTH_PORT

[Service]
Type=simple
$exec_start
Restart=always
RestartSec=5
EOF
}

# --- logs -----------------------------------------------------------------------------------------

# The Ops Agent ships the job's journal (this unit, startup.sh, shutdown.sh) to Cloud Logging; its
# whole config is the instance attribute spot-ops-agent-config (infra/logs.py), labels included.
# Logging never stops a boot: without the attribute, without the agent, or when the agent does not
# restart, the script says so and goes on, and the logs stay in this VM's journal.
read_logs() {
    LOGS_CONFIG=$(attr spot-ops-agent-config "")
}

ops_agent_installed() {
    [[ -x $AGENT_ENGINE ]]
}

# The drop-in of the job's unit and of the shutdown scripts' unit: the agent starts before them, so
# at shutdown it stops after them (systemd stops in reverse order) and ships their last lines (the
# emergency checkpoint, shutdown.sh's verdict).
logs_dropin() {
    cat <<EOF
# Written by startup.sh: the Ops Agent stops after this unit, so its last lines reach Cloud Logging.
[Unit]
After=$AGENT_UNITS
EOF
}

# configure_logs UNIT: the image's (or the just installed) agent gets the config from the metadata;
# the file is rewritten and the agent restarted only when the config changed.
configure_logs() {
    local dropin tmp
    if [[ -z $LOGS_CONFIG ]]; then
        log "ops agent: no spot-ops-agent-config in the metadata: the job's logs stay in this VM's journal"
        return 0
    fi
    if ! ops_agent_installed; then
        log "ops agent: not in the image (no $AGENT_ENGINE)"
        return 0
    fi
    dropin=$(logs_dropin)
    install_unit "$1.d/$LOGS_DROPIN" "$dropin"
    install_unit "$SHUTDOWN_SCRIPTS_UNIT.d/$LOGS_DROPIN" "$dropin"
    if [[ -f $AGENT_CONFIG && "$(<"$AGENT_CONFIG")" == "$LOGS_CONFIG" ]]; then
        log "ops agent: $AGENT_CONFIG is unchanged"
        return 0
    fi
    mkdir -p "${AGENT_CONFIG%/*}"
    tmp=$(mktemp "$AGENT_CONFIG.XXXXXX")
    printf '%s\n' "$LOGS_CONFIG" >"$tmp"
    chmod 644 "$tmp"
    mv -f "$tmp" "$AGENT_CONFIG"
    # The command the Ops Agent's documentation gives after a config change.
    if systemctl restart 'google-cloud-ops-agent*'; then
        log "ops agent: wrote $AGENT_CONFIG and restarted the agent: the job's journal goes to Cloud Logging"
    else
        log "ops agent: wrote $AGENT_CONFIG but the agent did not restart (systemctl status" \
            "'google-cloud-ops-agent*' says why): the job's logs may stay in this VM's journal"
    fi
}

# install_ops_agent UNIT: on an image without the agent, the release's package (agents/*.deb, from
# infra.logs.agent_package) is installed with dpkg, no package repository, then configured.
install_ops_agent() {
    local -a debs=()
    if [[ -z $LOGS_CONFIG ]] || ops_agent_installed; then return 0; fi
    if [[ -n $RELEASE_DIR ]]; then
        mapfile -t debs < <(compgen -G "$RELEASE_DIR/agents/google-cloud-ops-agent_*.deb" || true)
    fi
    if ((${#debs[@]} != 1)); then
        log "ops agent: not installed, and release ${RELEASE:-(none)} carries no package" \
            "(infra.logs.agent_package): the job's logs stay in this VM's journal"
        return 0
    fi
    log "ops agent: installing ${debs[0]##*/} from release $RELEASE"
    if DEBIAN_FRONTEND=noninteractive dpkg --install --force-confold "${debs[0]}" && ops_agent_installed; then
        configure_logs "$1"
    else
        log "ops agent: dpkg --install ${debs[0]##*/} failed: the job's logs stay in this VM's journal"
    fi
}

# --- W&B key --------------------------------------------------------------------------------------

# The env file the training unit reads: root only, rewritten at every boot (the secret may rotate).
write_env_file() {
    local key="" tmp
    if [[ -n $WANDB_SECRET ]]; then
        key=$(gcloud secrets versions access latest --secret="$WANDB_SECRET") ||
            die "cannot read secret $WANDB_SECRET (does the VM's service account have secretAccessor on it?)"
        [[ $key =~ ^[A-Za-z0-9._:-]+$ ]] ||
            die "secret $WANDB_SECRET does not look like a W&B API key (value not shown)"
    fi
    mkdir -p "$ETC_DIR"
    chmod 700 "$ETC_DIR"
    tmp=$(mktemp "$ETC_DIR/.spot-train.env.XXXXXX")
    chmod 600 "$tmp"
    {
        printf '# Written by startup.sh at every boot.\n'
        if [[ -n $key ]]; then printf 'WANDB_API_KEY=%s\n' "$key"; fi
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
    log "wrote $ENV_FILE${WANDB_SECRET:+ (W&B key from secret $WANDB_SECRET)}"
}

# --- systemd units --------------------------------------------------------------------------------

# exec_arg ARG: ARG as one token of an ExecStart line. `$` and `%` are doubled (systemd would expand
# them); a token with other characters than the plain ones is double-quoted, with \ and " escaped.
exec_arg() {
    local a=${1//\$/\$\$}
    a=${a//%/%%}
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$a"
    else
        a=${a//\\/\\\\}
        printf '"%s"' "${a//\"/\\\"}"
    fi
}

exec_line() {
    local out="ExecStart=" arg
    for arg in "$@"; do
        [[ $arg != *$'\n'* ]] || die "an argument holds a newline: $arg"
        out+="$(exec_arg "$arg") "
    done
    printf '%s' "${out% }"
}

# The tiers after the local SSD: the persistent disk on the master when the job is that one node
# (in a multi-node job a node's disk could hold only its own share), then the bucket.
checkpoint_overrides() {
    local tiers=""
    if [[ $ROLE == master && $NNODES == 1 ]]; then
        tiers+="{name:pd,url:'$ROOT$PD_MOUNT/checkpoints/$RUN_ID'},"
    fi
    tiers+="{name:gcs,url:'gs://$BUCKET/runs/$RUN_ID/checkpoints'}"
    printf '%s\n' \
        "checkpoint.store=$RUN_DIR/checkpoints" \
        "checkpoint.ephemeral=true" \
        "checkpoint.slower_tiers=[$tiers]"
}

train_unit() {
    local -a overrides argv
    local exec_start
    mapfile -t overrides < <(checkpoint_overrides)
    argv=("$HARNESS_PYTHON" -m harness.launch
        "run.name=$RUN_ID" "run.dir=$RUN_DIR" "${overrides[@]}"
        "launch.nnodes=$NNODES" "launch.nproc_per_node=$NPROC" "launch.rdzv_endpoint=$RDZV_ENDPOINT"
        launch.standalone=false "health.port=$HEALTH_PORT" "${USER_OVERRIDES[@]}")
    exec_start=$(exec_line "${argv[@]}")
    cat <<EOF
# Written by startup.sh; rewritten only when the job in the metadata changes.
[Unit]
Description=Spot training job $RUN_ID ($ROLE)
Wants=network-online.target
After=network-online.target
# Stopped after the shutdown script has signalled it and waited for its emergency checkpoint.
Before=google-shutdown-scripts.service

[Service]
Type=simple
WorkingDirectory=$OPT_DIR
EnvironmentFile=$ENV_FILE
$(service_environment)
$exec_start
# $PREEMPTED_EXIT = preempted, emergency checkpoint saved: a clean stop, never restarted on this VM.
SuccessExitStatus=$PREEMPTED_EXIT
RestartPreventExitStatus=$PREEMPTED_EXIT
Restart=on-failure
RestartSec=10
KillMode=control-group
KillSignal=SIGTERM
# Inside the 30 s between a Spot VM's ACPI soft-off and its hard stop.
TimeoutStopSec=28
EOF
}

rendezvous_unit() {
    local exec_start
    exec_start=$(exec_line "$HARNESS_PYTHON" -m harness.rendezvous --port "${RDZV_ENDPOINT##*:}" --run-id "$RUN_ID")
    cat <<EOF
# Written by startup.sh; rewritten only when the job in the metadata changes.
[Unit]
Description=Spot rendezvous store on port ${RDZV_ENDPOINT##*:}
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
WorkingDirectory=$OPT_DIR
$(service_environment)
$exec_start
Restart=always
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=10
EOF
}

# With an installed release, SPOT_CONF_DIR names its Hydra config tree.
service_environment() {
    printf 'Environment=PYTHONUNBUFFERED=1\n'
    if [[ -n $CONF_DIR ]]; then printf 'Environment=SPOT_CONF_DIR=%s\n' "$CONF_DIR"; fi
}

# install_unit NAME CONTENT: write the unit (or a drop-in, UNIT.d/FILE) only when it differs; sets
# UNITS_CHANGED.
install_unit() {
    local path="$UNIT_DIR/$1"
    mkdir -p "${path%/*}"
    if [[ -f $path && "$(<"$path")" == "$2" ]]; then
        log "$1 is unchanged"
        return
    fi
    printf '%s\n' "$2" >"$path.tmp"
    mv -f "$path.tmp" "$path"
    UNITS_CHANGED=1
    log "wrote $path"
}

# start_unit NAME: not enabled at boot on purpose: this script runs at every boot and must mount the
# disks first, then start it. Starting a running unit does nothing.
start_unit() {
    if [[ -n ${UNITS_CHANGED:-} ]]; then systemctl daemon-reload; fi
    systemctl start "$1"
    log "started $1"
}

# --- roles ----------------------------------------------------------------------------------------

run_coordinator() {
    local unit
    RUN_ID=$(attr spot-run-id)
    check spot-run-id "$RUN_ID" '^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$' \
        "letters, digits, '.', '_', '-', at most one '/' between two such names (a sweep's <sweep>/<job>)"
    if [[ -z ${SPOT_HARNESS_PYTHON:-} ]]; then read_release; fi
    read_preflight
    read_logs
    configure_logs "$RDZV_UNIT"
    install_release
    install_ops_agent "$RDZV_UNIT"
    preflight
    mkdir -p "$OPT_DIR"
    unit=$(rendezvous_unit)
    install_unit "$RDZV_UNIT" "$unit"
    start_unit "$RDZV_UNIT"
}

run_trainer() {
    local unit marker
    read_training_job
    read_release
    read_preflight
    read_logs
    configure_logs "$TRAIN_UNIT"
    prepare_local_ssd
    if [[ $ROLE == master ]]; then prepare_persistent_disk; fi
    install_release
    install_ops_agent "$TRAIN_UNIT"
    preflight
    write_env_file
    mkdir -p "$OPT_DIR"
    # shutdown.sh waits for this file after signalling the trainer.
    marker=$(marker_path)
    printf '%s\n' "$marker" >"$MARKER_PATH_FILE"
    unit=$(train_unit)
    install_unit "$TRAIN_UNIT" "$unit"
    start_unit "$TRAIN_UNIT"
}

# The trainer's PREEMPTED marker: ${run.dir}/PREEMPTED, with the last run.dir the overrides give
# (a relative one is relative to the unit's WorkingDirectory).
marker_path() {
    local dir=$RUN_DIR override
    for override in "${USER_OVERRIDES[@]}"; do
        if [[ $override == run.dir=* ]]; then dir=${override#run.dir=}; fi
    done
    [[ $dir == /* ]] || dir="$OPT_DIR/$dir"
    printf '%s/PREEMPTED' "$dir"
}

main() {
    log "starting (SPOT_ROOT='$ROOT', metadata $MD_BASE)"
    [[ $ROOT =~ ^$PLAIN_PATH$ ]] || die "SPOT_ROOT='$ROOT' must be a path of plain characters (no spaces, quotes, \$ or %)"
    read_role
    log "role: $ROLE"
    if [[ $ROLE == coordinator ]]; then run_coordinator; else run_trainer; fi
    log "done"
}

main "$@"
