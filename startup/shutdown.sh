#!/usr/bin/env bash
# What a Spot training VM runs when it is being stopped (the GCE shutdown-script; on preemption it
# starts at the ACPI soft-off, 30 s before the hard stop).
#
# Sends SIGTERM to the training unit, then waits for the trainer's PREEMPTED marker (its emergency
# checkpoint is saved) and returns as soon as it appears, or at the deadline, before GCP's hard stop.
# The marker's path is the one startup.sh recorded, or $SPOT_MARKER. startup/README.md lists the
# environment it honours.
set -euo pipefail
shopt -s inherit_errexit

readonly ROOT=${SPOT_ROOT:-}
readonly MD_BASE="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1"
DEADLINE_S=${SPOT_SHUTDOWN_DEADLINE_S:-25}
POLL_S=${SPOT_SHUTDOWN_POLL_S:-0.2}
readonly MARKER_PATH_FILE="$ROOT/etc/spot/marker-path"
readonly TRAIN_UNIT=spot-train.service
readonly RECENT_S=10

log() { printf '%(%Y-%m-%dT%H:%M:%S%z)T spot-shutdown: %s\n' -1 "$*" >&2; }

# Microseconds since the epoch, from the shell itself.
now_us() {
    local t=${EPOCHREALTIME//[!0-9]/}
    printf '%s' "$((10#$t))"
}

readonly SECONDS_RE='^([0-9]+)(\.([0-9]{1,6})[0-9]*)?$'

# seconds_to_us S: "25" or "1.5" -> microseconds.
seconds_to_us() {
    [[ $1 =~ $SECONDS_RE ]]
    local frac=${BASH_REMATCH[3]}000000
    printf '%s' "$((10#${BASH_REMATCH[1]} * 1000000 + 10#${frac:0:6}))"
}

check_settings() {
    if [[ ! $DEADLINE_S =~ $SECONDS_RE ]]; then
        log "SPOT_SHUTDOWN_DEADLINE_S=$DEADLINE_S is not a number of seconds: using 25"
        DEADLINE_S=25
    fi
    if [[ ! $POLL_S =~ $SECONDS_RE ]]; then
        log "SPOT_SHUTDOWN_POLL_S=$POLL_S is not a number of seconds: using 0.2"
        POLL_S=0.2
    fi
}

# Why the VM is going down, for the log only: a short timeout, never fatal.
shutdown_kind() {
    local answer
    answer=$(curl -sS --noproxy '*' --max-time 2 -H 'Metadata-Flavor: Google' \
        "$MD_BASE/instance/preempted" 2>/dev/null) || answer=unknown
    case $answer in
    TRUE) printf 'preemption' ;;
    FALSE) printf 'ordinary shutdown' ;;
    *) printf 'shutdown (instance/preempted unreadable)' ;;
    esac
}

marker_path() {
    if [[ -n ${SPOT_MARKER:-} ]]; then
        printf '%s' "$SPOT_MARKER"
    elif [[ -f $MARKER_PATH_FILE ]]; then
        printf '%s' "$(<"$MARKER_PATH_FILE")"
    fi
}

# A token that changes when the marker is written: absent, or its inode and modification time. A
# marker left from an earlier preemption (the same VM rebooted) does not count until rewritten.
marker_state() {
    stat -c '%i %y' "$1" 2>/dev/null || printf 'absent'
}

# marker_is_recent PATH START_S: written at most RECENT_S before this script started, so by this
# preemption (the trainer can react to the metadata notice and save before this script gets going);
# a marker from an earlier boot is older than a VM recreate and boot.
marker_is_recent() {
    local mtime
    mtime=$(stat -c '%Y' "$1" 2>/dev/null) || return 1
    ((mtime >= $2 - RECENT_S))
}

# systemctl is-active exits 3 (inactive, failed) or 4 (no such unit) when nothing runs.
trainer_stopped() {
    local rc=0
    systemctl is-active --quiet "$TRAIN_UNIT" || rc=$?
    ((rc == 3 || rc == 4))
}

# wait_for_marker PATH BEFORE DEADLINE_US: 0 when it is written, 1 at the deadline, 2 when the trainer
# exited without writing it (nothing left to wait for: the VM may power off at once).
wait_for_marker() {
    while [[ $(marker_state "$1") == "$2" || ! -e $1 ]]; do
        (($(now_us) < $3)) || return 1
        if trainer_stopped; then return 2; fi
        sleep "$POLL_S"
    done
}

main() {
    local start start_s=$EPOCHSECONDS deadline marker before rc=0
    start=$(now_us)
    check_settings
    deadline=$((start + $(seconds_to_us "$DEADLINE_S")))
    marker=$(marker_path)
    if [[ -z $marker ]]; then
        log "no training job on this VM (no $MARKER_PATH_FILE, no SPOT_MARKER): nothing to wait for"
        return 0
    fi
    if trainer_stopped; then
        log "$TRAIN_UNIT is not running: nothing to wait for"
        return 0
    fi
    before=$(marker_state "$marker")
    if marker_is_recent "$marker" "$start_s"; then before=absent; fi
    systemctl kill --signal=SIGTERM "$TRAIN_UNIT" || log "systemctl kill $TRAIN_UNIT failed; waiting anyway"
    log "$(shutdown_kind): sent SIGTERM to $TRAIN_UNIT, waiting up to ${DEADLINE_S}s for $marker"
    wait_for_marker "$marker" "$before" "$deadline" || rc=$?
    case $rc in
    0) log "marker appeared after $((($(now_us) - start) / 1000)) ms: emergency checkpoint saved" ;;
    2) log "$TRAIN_UNIT exited after $((($(now_us) - start) / 1000)) ms without a marker on this VM (another node may hold it)" ;;
    *) log "marker did not appear within ${DEADLINE_S}s: no emergency checkpoint confirmed; the last committed one stands" ;;
    esac
}

main "$@"
