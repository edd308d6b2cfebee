#!/usr/bin/env bash
# tests/slurm/cluster.sh start|stop|status
#
# A real SLURM cluster on this one machine, for tests/test_slurm.py: munged, slurmctld, and two slurmd
# compute nodes n1 and n2 (each with its own port, both at 127.0.0.1). Jobs are submitted as the
# unprivileged user $SLURM_TEST_USER. Needs root: it installs Debian's slurm-wlm and munge when they are
# missing, adds that user, and names n1 and n2 in /etc/hosts (torch's rendezvous resolves the first
# node's name, so the names must resolve on the machine, not only in slurm.conf).
#
#   start  write the configuration under $SLURM_TEST_DIR, start the daemons in the background, wait
#          (at most $SLURM_TEST_START_TIMEOUT seconds) until both nodes are idle; clients then need
#          SLURM_CONF=$SLURM_TEST_DIR/slurm.conf (printed on the last line)
#   stop   kill every daemon that start started, by the PIDs it recorded, and remove $SLURM_TEST_DIR
#          and the /etc/hosts line
set -euo pipefail

STATE="${SLURM_TEST_DIR:-/tmp/vgg_dist-slurm}"
USER_NAME="${SLURM_TEST_USER:-vggtest}"
PORT_BASE="${SLURM_TEST_PORT_BASE:-16817}"  # slurmctld; the nodes take the next two
START_TIMEOUT="${SLURM_TEST_START_TIMEOUT:-60}"
HOSTS_MARK="# vgg_dist test cluster"
CONF="$STATE/slurm.conf"

say() { echo "cluster.sh: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurm-wlm munge >/dev/null || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }
}

ensure_user() {
  id -u "$USER_NAME" >/dev/null 2>&1 || useradd --system --no-create-home --shell /bin/bash "$USER_NAME"
}

ensure_hosts() {
  grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 n1 n2 $HOSTS_MARK" >> /etc/hosts
}

write_conf() {
  cat > "$CONF" <<EOF
# Written by tests/slurm/cluster.sh: two compute nodes on this machine.
ClusterName=vggtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also holds a requeued job back before it may start again (120 s by default).
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (a container, a CI runner): track a step's processes by their parent process ids.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Schedule within seconds, not the default minute: a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Keep finished jobs in scontrol's view for the tests' checks.
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmdTimeout=300
SlurmctldTimeout=300
# Four CPUs each, whatever the machine has (config_overrides: slurmd does not check), so the tests' jobs
# (one or two CPUs each, mostly waiting on each other) can run side by side on a 2-core machine.
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 1)) CPUs=4 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 2)) CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$CONF"
}

start_munge() {
  mkdir -p "$STATE/munge"
  chown munge:munge "$STATE/munge"
  chmod 755 "$STATE/munge"  # clients (the job's user too) connect to the socket inside
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged --socket="$STATE/munge/munge.socket" --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
  wait_for "munged" 10 test -S "$STATE/munge/munge.socket"
  cat "$STATE/munge/munged.pid" >> "$STATE/pids"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: poll COMMAND until it succeeds, or fail after SECONDS
  local what="$1" seconds="$2" deadline
  shift 2
  deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      say "$what not ready after ${seconds}s"
      return 1
    fi
    sleep 0.5
  done
}

nodes_idle() {
  [ "$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %t' | sort | tr '\n' ' ')" = "n1 idle n2 idle " ]
}

start() {
  if [ -f "$STATE/pids" ]; then
    say "already started ($STATE/pids exists); run stop first"
    return 1
  fi
  install_packages
  ensure_user
  ensure_hosts
  mkdir -p "$STATE/ctld" "$STATE/spool-n1" "$STATE/spool-n2"
  chmod 755 "$STATE"
  : > "$STATE/pids"
  write_conf
  start_munge
  export SLURM_CONF="$CONF"
  slurmctld -f "$CONF" -i  # -i: ignore any saved state; it forks into the background
  wait_for "slurmctld" 20 test -s "$STATE/slurmctld.pid"
  cat "$STATE/slurmctld.pid" >> "$STATE/pids"
  for node in n1 n2; do
    slurmd -f "$CONF" -N "$node"
    wait_for "slurmd $node" 20 test -s "$STATE/slurmd-$node.pid"
    cat "$STATE/slurmd-$node.pid" >> "$STATE/pids"
  done
  if ! wait_for "nodes n1 and n2 (idle)" "$START_TIMEOUT" nodes_idle; then
    sinfo -N >&2 || true
    tail -n 20 "$STATE"/*.log >&2 || true
    return 1
  fi
  say "n1 and n2 idle; submit as $USER_NAME with SLURM_CONF=$CONF"
  echo "SLURM_CONF=$CONF"
}

stop() {
  local pid pids=()
  if [ -f "$STATE/pids" ]; then
    mapfile -t pids < "$STATE/pids"
  fi
  # The daemons' own pid files too, in case start died before recording one.
  for file in "$STATE/slurmctld.pid" "$STATE"/slurmd-*.pid "$STATE/munge/munged.pid"; do
    [ -s "$file" ] && pids+=("$(cat "$file")")
  done
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if grep -q "$HOSTS_MARK" /etc/hosts; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replace it.
    grep -v "$HOSTS_MARK" /etc/hosts > "$STATE.hosts" || true
    cat "$STATE.hosts" > /etc/hosts
    rm -f "$STATE.hosts"
  fi
  rm -rf "$STATE"
}

status() {
  SLURM_CONF="$CONF" sinfo -N
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
