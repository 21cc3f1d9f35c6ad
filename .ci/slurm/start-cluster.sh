#!/usr/bin/env bash
# Start a single-node SLURM cluster on 127.0.0.1 for tests/test_slurm.py (CI runs this as root).
#
# Idempotent: installs Debian's slurmctld, slurmd, slurm-client and munge if missing, writes
# /etc/slurm/slurm.conf (only if absent or written by this script), starts munged, slurmctld and
# slurmd directly (no systemd) unless already running, and waits until `sinfo` shows the node idle.
# No slurmdbd: job history comes from the job completion log (JobCompType=jobcomp/filetxt) and
# Snakemake polls job states with `--slurm-status-command squeue` (profiles/slurm).
# Stop it with .ci/slurm/stop-cluster.sh.
set -euo pipefail

MARKER="# khe-vol single-node test cluster, written by .ci/slurm/start-cluster.sh"
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
HOST=$(hostname -s)

say() { echo "start-cluster: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (installs packages, starts munged/slurmctld/slurmd)"; exit 1
fi

# 1. Packages.
missing=()
for cmd in slurmctld slurmd sinfo munged; do
    command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi
export PATH=$PATH:/usr/sbin

# Already up (this script ran before, or a real cluster is configured)? Nothing to do.
if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    say "cluster already running:"; sinfo >&2; exit 0
fi

# 2. Config. Never overwrite a slurm.conf this script did not write.
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    say "$CONF exists and was not written by this script; not touching it. Start that cluster, or move it away."
    exit 1
fi
cpus=$(nproc)
mem_total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# RealMemory below physical RAM, or slurmd registers the node as invalid. profiles/slurm asks up to
# 4 GB a job: on a machine too small for that, advertise 8 GB anyway (config_overrides: slurmd
# trusts slurm.conf over the hardware); the demo's jobs use under 300 MB each.
real_mem=$(( mem_total * 8 / 10 ))
overrides="#SlurmdParameters=config_overrides"
if [ "$real_mem" -lt "${MIN_REAL_MEMORY:-8192}" ]; then
    real_mem=${MIN_REAL_MEMORY:-8192}; overrides="SlurmdParameters=config_overrides"
fi
mkdir -p /etc/slurm "$LOGDIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /run/slurm
cat > "$CONF" <<CONFEOF
$MARKER
ClusterName=khevol
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ReturnToService=2
$overrides
# No cgroups (containers, CI runners): track processes by parent id.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: finished jobs are kept in the job completion log (history for tests),
# and in squeue for MinJobAge seconds (Snakemake's status polling).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFEOF
cat > /etc/slurm/cgroup.conf <<CONFEOF
$MARKER
# Not used (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none); present so no daemon looks for it.
CgroupPlugin=autodetect
CONFEOF

# 3. munge (as the munge user, with a key).
if [ ! -s /etc/munge/munge.key ]; then
    say "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null || { say "munged does not answer"; exit 1; }

# 4. slurmctld and slurmd (they daemonise; pid files under /run/slurm).
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurm/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! running /run/slurm/slurmd.pid; then
    say "starting slurmd"
    slurmd
fi

# 5. Wait for the node.
for _ in $(seq 150); do
    state=$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null || true)
    case "$state" in
        idle|mix|alloc) say "cluster up: node $HOST $state ($cpus CPUs, ${real_mem} MB)"; sinfo >&2; exit 0 ;;
        down*|drain*|inval*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
say "node $HOST not idle after 30 s (state: ${state:-none}); logs:"
tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
exit 1
