#!/usr/bin/env bash
# Stop the single-node cluster .ci/slurm/start-cluster.sh started (slurmd, slurmctld, munged),
# by the pid files those daemons wrote. Leaves packages, config and job history in place.
set -uo pipefail
for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "stop-cluster: stopped $(basename "$pidfile" .pid) ($pid)" >&2
    fi
done
