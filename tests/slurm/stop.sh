#!/usr/bin/env bash
# Stop the daemons start.sh started, by their pid files, and wait for them.
set -u
dir=$(realpath -m "$1")
pids=()
munge_pidfile=$(cat "$dir/munged.pidfile" 2>/dev/null)
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" $munge_pidfile; do
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && pids+=("$pid")
  fi
done
for pid in "${pids[@]}"; do
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
done
exit 0
