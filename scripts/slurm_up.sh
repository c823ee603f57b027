#!/usr/bin/env bash
# Install (Debian/Ubuntu packages) and start a single-node SLURM cluster on this machine. Idempotent: re-running
# it checks each piece and only installs, writes or starts what is missing; a changed configuration is
# re-applied by restarting the daemons.
#
#   bash scripts/slurm_up.sh            (what `make slurm-up` runs; needs root or sudo)
#
# Environment:
#   BOLTZBENCH_SLURM_FORCE=1   overwrite an /etc/slurm/slurm.conf that this script did not write
#   BOLTZBENCH_SLURM_GPUS=N    declare N count-only GPUs (GRES) so GPU-requesting jobs can be scheduled on a
#                              CPU-only box to test that code path (CUDA stays unavailable inside the job)
#   BOLTZBENCH_SLURM_TASK_PLUGIN=task/none|task/affinity   (default task/affinity, task/none if it fails)
# Files: config /etc/slurm/slurm.conf (from scripts/slurm/slurm.conf.in), state /var/spool/slurm-boltzbench,
# logs /var/log/slurm-boltzbench. Stop with scripts/slurm_down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
TEMPLATE=scripts/slurm/slurm.conf.in
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurm-boltzbench
LOG=/var/log/slurm-boltzbench
RUN=/run/slurm-boltzbench
MARK="# managed by boltzbench scripts/slurm_up.sh"

say() { echo "slurm-up: $*"; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else
  command -v sudo >/dev/null || die "needs root (or sudo) to install packages and start daemons"
  SUDO=(sudo -n)
fi
as_root() { "${SUDO[@]}" "$@"; }

# ---------------------------------------------------------------------------------------------- packages
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "apt-get not found: install ${need[*]} with your package manager"
  say "installing ${need[*]} (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
else
  say "packages present ($(sbatch --version 2>/dev/null || echo slurm))"
fi

# ---------------------------------------------------------------------------------------------- munge
id munge >/dev/null 2>&1 || die "user 'munge' missing after installing munge"
if ! as_root test -s /etc/munge/munge.key; then
  say "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null; then as_root mungekey --create --force
  else as_root dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
as_root chown munge:munge /etc/munge/munge.key
as_root chmod 0400 /etc/munge/munge.key
as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged running"
else
  say "starting munged"
  as_root rm -f /run/munge/munged.pid
  if command -v runuser >/dev/null; then as_root runuser -u munge -- /usr/sbin/munged
  else as_root su -s /bin/sh munge -c /usr/sbin/munged; fi
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------------------------------------- config
HOST=$(hostname -s)
read -r CPUS BOARDS SOCKETS CORES THREADS REALMEM < <(slurmd -C | tr ' ' '\n' | awk -F= '
  /^CPUs=/{c=$2} /^Boards=/{b=$2} /^SocketsPerBoard=/{s=$2} /^CoresPerSocket=/{k=$2}
  /^ThreadsPerCore=/{t=$2} /^RealMemory=/{m=$2} END{print c, b, s, k, t, m}')
[ -n "${CPUS:-}" ] && [ -n "${REALMEM:-}" ] || die "could not read the node's hardware from 'slurmd -C'"
# 80 % of the physical memory, in whole GB (deterministic, so that re-running does not rewrite the config)
MEM=$(( REALMEM * 8 / 10 / 1024 * 1024 ))
DEF_MEM=$(( MEM / CPUS )); [ $DEF_MEM -gt 2048 ] && DEF_MEM=2048
SLURM_USER=root; id slurm >/dev/null 2>&1 && SLURM_USER=slurm
TASK_PLUGIN=${BOLTZBENCH_SLURM_TASK_PLUGIN:-task/affinity}
GPUS=${BOLTZBENCH_SLURM_GPUS:-0}
if [ "$GPUS" -gt 0 ]; then GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$GPUS"; else GRES_TYPES=""; GRES_NODE=""; fi

render() {
  sed -e "s|@HOST@|$HOST|g" -e "s|@SLURM_USER@|$SLURM_USER|g" -e "s|@STATE@|$STATE|g" -e "s|@RUN@|$RUN|g" \
      -e "s|@LOG@|$LOG|g" -e "s|@TASK_PLUGIN@|$1|g" -e "s|@DEF_MEM@|$DEF_MEM|g" -e "s|@CPUS@|$CPUS|g" \
      -e "s|@BOARDS@|$BOARDS|g" -e "s|@SOCKETS@|$SOCKETS|g" -e "s|@CORES@|$CORES|g" -e "s|@THREADS@|$THREADS|g" \
      -e "s|@MEM@|$MEM|g" -e "s|@GRES_TYPES@|$GRES_TYPES|g" -e "s|@GRES_NODE@|$GRES_NODE|g" "$TEMPLATE"
}

if as_root test -f "$CONF" && ! as_root grep -qF "$MARK" "$CONF" && [ "${BOLTZBENCH_SLURM_FORCE:-0}" != 1 ]; then
  die "$CONF exists and was not written by this script; set BOLTZBENCH_SLURM_FORCE=1 to replace it"
fi
as_root mkdir -p "$CONF_DIR" "$STATE/slurmctld" "$STATE/slurmd" "$LOG" "$RUN"
as_root chown "$SLURM_USER" "$STATE/slurmctld" "$LOG" "$RUN"
as_root chmod 0755 "$LOG" "$RUN"

write_conf() {  # $1 task plugin; returns 0 when the file changed
  local tmp; tmp=$(mktemp)
  render "$1" >"$tmp"
  if [ "$GPUS" -gt 0 ]; then echo "Name=gpu Count=$GPUS" >"$tmp.gres"; fi
  local changed=1
  if as_root cmp -s "$tmp" "$CONF"; then changed=0; fi
  if [ $changed = 1 ]; then as_root install -m 0644 "$tmp" "$CONF"; fi
  if [ "$GPUS" -gt 0 ]; then
    as_root cmp -s "$tmp.gres" "$CONF_DIR/gres.conf" || { as_root install -m 0644 "$tmp.gres" "$CONF_DIR/gres.conf"; changed=1; }
  fi
  rm -f "$tmp" "$tmp.gres"
  return $((1 - changed))
}

pid_alive() { as_root test -f "$1" && as_root kill -0 "$(as_root cat "$1")" 2>/dev/null; }
stop_daemon() {  # $1 pid file
  if pid_alive "$1"; then
    local pid; pid=$(as_root cat "$1"); as_root kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do as_root kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
}

CHANGED=0
write_conf "$TASK_PLUGIN" && CHANGED=1
if [ $CHANGED = 1 ]; then
  say "wrote $CONF (node $HOST: $CPUS CPUs, ${MEM} MB, $TASK_PLUGIN)"
  stop_daemon "$RUN/slurmd.pid"; stop_daemon "$RUN/slurmctld.pid"
else
  say "$CONF up to date"
fi

start_daemons() {
  if pid_alive "$RUN/slurmctld.pid"; then say "slurmctld running"; else
    say "starting slurmctld"; as_root /usr/sbin/slurmctld || return 1
  fi
  for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
  scontrol ping 2>/dev/null | grep -q UP || return 1
  if pid_alive "$RUN/slurmd.pid"; then say "slurmd running"; else
    say "starting slurmd"; as_root /usr/sbin/slurmd || return 1
  fi
  return 0
}

node_ready() { sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'; }

if ! start_daemons; then
  die "slurmctld did not come up (see $LOG/slurmctld.log)"
fi
for _ in $(seq 60); do node_ready && break; sleep 0.5; done
if ! node_ready && [ "$TASK_PLUGIN" = task/affinity ] && [ -z "${BOLTZBENCH_SLURM_TASK_PLUGIN:-}" ]; then
  say "node not ready with task/affinity; retrying with task/none"
  TASK_PLUGIN=task/none
  write_conf "$TASK_PLUGIN" || true
  stop_daemon "$RUN/slurmd.pid"; stop_daemon "$RUN/slurmctld.pid"
  start_daemons || die "slurmctld did not come up (see $LOG/slurmctld.log)"
  for _ in $(seq 60); do node_ready && break; sleep 0.5; done
fi
if ! node_ready; then
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  if echo "$state" | grep -Eq 'down|drain'; then
    as_root scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    for _ in $(seq 20); do node_ready && break; sleep 0.5; done
  fi
fi
node_ready || die "node $HOST is not ready (sinfo: $(sinfo -h -N -o '%N %T %E' 2>&1 | head -3); see $LOG/)"
say "ready: $(sinfo -h -o '%P %a %D %T %C' | head -1) (partition avail nodes state CPUs A/I/O/T)"
