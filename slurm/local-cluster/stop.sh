#!/usr/bin/env bash
# Stop the cluster slurm/local-cluster/start.sh started: cancel its jobs, then stop every slurmd,
# slurmctld and munged by their pid files. --clean also removes the state directory.
#   slurm/local-cluster/stop.sh [--clean]          (DC_SLURM_DIR as for start.sh)
set -uo pipefail
dir=${DC_SLURM_DIR:-/tmp/dist-contrast-slurm}
[ -d "$dir" ] || { echo "local-cluster: no cluster in $dir" >&2; exit 0; }
export SLURM_CONF=$dir/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Jobs first, so that no training process outlives its nodes.
if alive "$dir/slurmctld.pid"; then
  scancel --full --user "$(id -un)" 2>/dev/null
  for _ in $(seq 1 40); do
    [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
    sleep 0.5
  done
fi

stop() {  # SIGTERM, then SIGKILL after 10 s
  local pidfile=$1 pid
  alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
  kill -9 "$pid" 2>/dev/null
}
for pidfile in "$dir"/slurmd-*.pid; do
  stop "$pidfile"
done
stop "$dir/slurmctld.pid"
stop "$dir/munged.pid"
rm -f "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"
if [ "${1:-}" = --clean ]; then
  rm -rf "$dir"
fi
echo "local Slurm cluster stopped ($dir)"
