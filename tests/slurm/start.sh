#!/usr/bin/env bash
# Start a single-node SLURM on this machine for the integration test:
# munged, slurmctld and slurmd as root, one partition, one pretend GPU
# (gres on /dev/null). State and logs live under DIR; the config goes to
# /etc/slurm, where job steps (srun inside sbatch jobs) look for it.
#   usage: start.sh DIR      prints KEY=VALUE lines (SLURM_CONF, partition)
# Needs Debian's slurm-wlm and munge (`make test` installs them as root).
set -euo pipefail
dir=$(realpath -m "$1")
mkdir -p "$dir"/{state,spool}
host=$(hostname -s)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cpus=$(nproc)

# munge authenticates slurm's daemons and clients to each other.
if ! pgrep -x munged >/dev/null; then
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  # Its pid file stays in /run/munge: the munge user cannot enter DIR.
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged
  else
    munged --force
  fi
  echo /run/munge/munged.pid >"$dir/munged.pidfile"  # started here: stop.sh stops it
fi

conf=/etc/slurm/slurm.conf
if [ -e "$conf" ] && ! grep -q "kdflow test cluster" "$conf"; then
  echo "$conf exists and is not kdflow's test cluster: not touching it" >&2
  exit 1
fi
mkdir -p /etc/slurm
cat >"$conf" <<CONF
# kdflow test cluster (tests/slurm/start.sh); safe to delete
ClusterName=kdflowtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
MinJobAge=3600
ReturnToService=2
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=kdflow Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
cat >/etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=$host Name=gpu File=/dev/null
CONF

export SLURM_CONF="$conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "SLURM_CONF=$SLURM_CONF"
    echo "PARTITION=kdflow"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
