#!/usr/bin/env bash
# Start an emulated N-node Slurm cluster on this machine: one munged, one slurmctld and N slurmd
# (node1..nodeN, each on its own port), every file under one state directory.
#   slurm/local-cluster/start.sh [N]        N nodes (default 2); needs root, slurm-wlm and munge
#   . /tmp/dist-contrast-slurm/env.sh       SLURM_CONF for sbatch, squeue, scontrol, scancel
#   slurm/local-cluster/stop.sh [--clean]
# Environment:
#   DC_SLURM_DIR          state directory (default /tmp/dist-contrast-slurm)
#   DC_SLURM_PORT         first of N+1 consecutive ports: slurmctld, then one per slurmd (36817)
#   DC_SLURM_CPUS         CPUs each node offers (default: this machine's)
#   DC_SLURM_NODE_PREFIX  node names are PREFIX1..PREFIXN (default node); they must resolve to
#                         127.0.0.1 (training ranks reach the first node by name): missing names
#                         are added to /etc/hosts.
set -euo pipefail
nodes=${1:-2}
dir=${DC_SLURM_DIR:-/tmp/dist-contrast-slurm}
port=${DC_SLURM_PORT:-36817}
cpus=${DC_SLURM_CPUS:-$(nproc)}
prefix=${DC_SLURM_NODE_PREFIX:-node}
die() { echo "local-cluster: $*" >&2; exit 1; }

[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of nodes, not '$nodes'"
[ "$(id -u)" = 0 ] || die "needs root: slurmd runs the jobs as root here (SlurmUser=root)"
for bin in munged slurmctld slurmd sinfo sbatch srun scontrol; do
  command -v "$bin" >/dev/null || die "'$bin' not found: apt-get install slurm-wlm munge"
done
if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
  die "a cluster is already running in $dir (slurm/local-cluster/stop.sh first)"
fi
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
dir=$(cd "$dir" && pwd)
chmod 755 "$dir"

# Node names must reach this machine: the ranks find their master at the first node's name.
names=$(seq -f "$prefix%g" 1 "$nodes")
for name in $names; do
  addr=$(getent ahostsv4 "$name" | awk 'NR == 1 {print $1}' || true)
  if [ -z "$addr" ]; then
    [ -w /etc/hosts ] || die "'$name' does not resolve and /etc/hosts is not writable"
    echo "127.0.0.1 $name" >>/etc/hosts
  elif [ "$addr" != 127.0.0.1 ]; then
    die "'$name' resolves to $addr, not 127.0.0.1: choose DC_SLURM_NODE_PREFIX=another"
  fi
done

# MUNGE: a key of this cluster's own and a daemon on a socket in the state directory.
if [ ! -s "$dir/munge.key" ]; then
  head -c 1024 /dev/urandom >"$dir/munge.key"
  chmod 400 "$dir/munge.key"
fi
munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
  --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" --log-file="$dir/log/munged.log"

{
  cat <<EOF
# Written by slurm/local-cluster/start.sh: $nodes emulated nodes on $(hostname).
ClusterName=dclocal
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# No cgroups in containers: processes are tracked through their parents, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Look for runnable jobs every second (a requeued job starts as soon as it may).
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
KillWait=15
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
EOF
  i=0
  for name in $names; do
    i=$((i + 1))
    echo "NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$cpus State=UNKNOWN"
  done
  echo "PartitionName=local Nodes=$(echo $names | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP"
} >"$dir/slurm.conf"
echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env.sh"
export SLURM_CONF=$dir/slurm.conf

slurmctld
for name in $names; do
  slurmd -N "$name"
done

# Ready when every node is idle.
for _ in $(seq 1 60); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  if [ "$idle" -ge "$nodes" ]; then
    echo "local Slurm cluster up: $nodes node(s) ($(echo $names)), $cpus CPU(s) each; state in $dir"
    echo "  . $dir/env.sh    # then sbatch, squeue, scontrol as usual"
    exit 0
  fi
  sleep 0.5
done
sinfo -N >&2 || true
tail -n 5 "$dir/log/slurmctld.log" "$dir"/log/slurmd-*.log >&2 || true
die "the nodes did not come up within 30 s (logs in $dir/log)"
