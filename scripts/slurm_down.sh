#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by scripts/slurm_up.sh (slurmd, slurmctld, munged). Idempotent.
#   bash scripts/slurm_down.sh            stop the daemons (packages, config and job state are kept)
#   bash scripts/slurm_down.sh --purge    also delete the job state (/var/spool/slurm-boltzbench) and logs
# Jobs still running are cancelled first (their cells resume from their checkpoints on the next launch).
set -uo pipefail
STATE=/var/spool/slurm-boltzbench
LOG=/var/log/slurm-boltzbench
RUN=/run/slurm-boltzbench
say() { echo "slurm-down: $*"; }
if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
as_root() { "${SUDO[@]}" "$@"; }

stop() {  # $1 name, $2 pid file
  if as_root test -f "$2"; then
    local pid; pid=$(as_root cat "$2")
    if as_root kill -0 "$pid" 2>/dev/null; then
      say "stopping $1 (pid $pid)"
      as_root kill "$pid" 2>/dev/null
      for _ in $(seq 40); do as_root kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      as_root kill -0 "$pid" 2>/dev/null && as_root kill -9 "$pid" 2>/dev/null
    fi
    as_root rm -f "$2"
  else
    say "$1 not running"
  fi
}

if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then say "cancelling queued/running jobs"; as_root scancel --full --quiet -u "$(id -un)" 2>/dev/null; sleep 1; fi
fi
stop slurmd "$RUN/slurmd.pid"
stop slurmctld "$RUN/slurmctld.pid"
stop munged /run/munge/munged.pid
if [ "${1:-}" = "--purge" ]; then
  say "removing $STATE and $LOG"
  as_root rm -rf "$STATE" "$LOG"
fi
say "done"
