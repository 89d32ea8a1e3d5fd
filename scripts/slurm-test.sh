#!/usr/bin/env bash
# A real test of the Slurm backend on a single-node cluster started here (not a mock):
#   installs Debian's slurm-wlm and munge when missing; starts munged (on its own socket), slurmctld and slurmd on a
#   slurm.conf for this host in a temp folder; submits a smoke sweep of 2 strategies x 2 seeds (deterministic mode),
#   waits, collects, and checks the table equals the local backend's on the same sweep; cancels a task mid-run with
#   scancel, resubmits, and checks nothing was lost or trained twice; checks the bad inputs (no sbatch on PATH, an
#   unreachable controller, a run root that is not writable, a task that fails three times); stops every daemon it
#   started (by PID) and removes the temp folder.
# Prints one line per check and ends with "slurm: N passed, N failed"; exit code 0 only when all passed.
#
#   bash scripts/slurm-test.sh        (root, or sudo; build first: dotnet build -c Release)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
E="$REPO/src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/earlyexit.dll"
[ -f "$E" ] || { echo "build first: dotnet build -c Release"; echo "slurm: 0 passed, 1 failed"; exit 1; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else echo "slurm test: needs root (to start slurmd) or sudo"; echo "slurm: 0 passed, 1 failed"; exit 1; fi
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; } \
    || { echo "slurm test: could not install slurm-wlm and munge"; echo "slurm: 0 passed, 1 failed"; exit 1; }
fi

T=$(mktemp -d /tmp/earlyexit-slurm.XXXXXX)
chmod 755 "$T"
passed=0; failed=0
check() {  # NAME, then 0 (passed) or not
  if [ "$2" -eq 0 ]; then echo "slurm: $1: passed"; passed=$((passed + 1)); else echo "slurm: $1: FAILED"; failed=$((failed + 1)); fi
}
stop_daemons() {
  for f in "$T/slurmd.pid" "$T/slurmctld.pid" "$T/munge-run/munged.pid"; do
    [ -f "$f" ] && $SUDO kill "$(cat "$f")" 2>/dev/null
  done
  sleep 1
  for f in "$T/slurmd.pid" "$T/slurmctld.pid" "$T/munge-run/munged.pid"; do
    [ -f "$f" ] && $SUDO kill -9 "$(cat "$f")" 2>/dev/null
  done
  return 0
}
cleanup() { stop_daemons; $SUDO rm -rf "$T"; }
trap cleanup EXIT

# munged on its own socket and key, so that a system munge (if any) is left alone.
$SUDO mkdir -p "$T/munge-key" "$T/munge-run" "$T/state" "$T/spool" "$T/log"
$SUDO chown munge:munge "$T/munge-key" "$T/munge-run"
$SUDO chmod 700 "$T/munge-key"; $SUDO chmod 755 "$T/munge-run"
$SUDO dd if=/dev/urandom bs=1 count=1024 of="$T/munge-key/munge.key" status=none
$SUDO chown munge:munge "$T/munge-key/munge.key"; $SUDO chmod 400 "$T/munge-key/munge.key"
$SUDO runuser -u munge -- munged --socket="$T/munge-run/munge.socket" --key-file="$T/munge-key/munge.key" \
  --pid-file="$T/munge-run/munged.pid" --log-file="$T/munge-key/munged.log" --seed-file="$T/munge-key/munged.seed"
check "munged started" $?

H=$(hostname -s)
PORT=$((20000 + RANDOM % 20000))
write_conf() {  # FILE, CONTROLLER PORT, MESSAGE TIMEOUT
  cat > "$1" <<EOF
ClusterName=earlyexit-test
SlurmctldHost=$H
SlurmUser=root
SlurmctldPort=$2
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$T/munge-run/munge.socket
CredType=cred/munge
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=600
MessageTimeout=$3
NodeName=$H CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}
write_conf "$T/slurm.conf" "$PORT" 10
export SLURM_CONF="$T/slurm.conf"
$SUDO slurmctld -f "$T/slurm.conf" && $SUDO slurmd -f "$T/slurm.conf"
ok=1
for _ in $(seq 1 60); do [ "$(sinfo -h -o %T 2>/dev/null)" = "idle" ] && { ok=0; break; }; sleep 1; done
check "slurmctld and slurmd up, the node idle" $ok
if [ $ok -ne 0 ]; then tail -5 "$T/log/slurmctld.log" "$T/log/slurmd.log"; echo "slurm: $passed passed, $((failed)) failed"; exit 1; fi

cli() { CI=true dotnet "$E" "$@"; }
# Waits until every run of a sweep is finished (or TIMEOUT seconds pass); 0 when all finished.
wait_finished() {  # ROOT, TIMEOUT
  local deadline=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    local s; s=$(cli sweep status "$1" --json 2>/dev/null)
    local total finished
    total=$(grep -c '"task":' <<<"$s"); finished=$(grep -c '"state": "finished"' <<<"$s")
    [ "$total" -gt 0 ] && [ "$total" -eq "$finished" ] && return 0
    sleep 2
  done
  cli sweep status "$1"
  return 1
}
SMOKE=(--scale smoke --strategies joint,sequential-ewc --seeds 2 --deterministic --threads 1)

# 1. A smoke sweep of 2 strategies x 2 seeds through Slurm, and the same sweep through the local executor.
dotnet fsi experiments/table1.fsx "${SMOKE[@]}" --backend slurm --out "$T/slurm/table1" > "$T/submit.log" 2>&1
grep -q "submitted Slurm array job" "$T/submit.log"; check "table1.fsx --backend slurm submits one job array" $?
ROOT="$T/slurm/table1/resnet34-fashion-mnist-smoke"
wait_finished "$ROOT" 600; check "the 4 array tasks finish" $?
cli sweep collect "$ROOT" > "$T/collect.log" 2>&1
check "sweep collect writes the tables" $?
dotnet fsi experiments/table1.fsx "${SMOKE[@]}" --backend local --jobs 2 --out "$T/local/table1" > "$T/local.log" 2>&1
check "the same sweep on the local backend" $?
# The values (rows, quantities, n, mean, std, CI, per-seed values) of both tables; provenance columns aside.
cut -d, -f1-7 "$ROOT/table1.csv" > "$T/a.csv"; cut -d, -f1-7 "$T/local/table1/resnet34-fashion-mnist-smoke/table1.csv" > "$T/b.csv"
cmp -s "$T/a.csv" "$T/b.csv" && [ "$(wc -l < "$T/a.csv")" -gt 10 ]; check "Slurm's table equals the local backend's (deterministic mode)" $?

# 2. A task cancelled mid-run with scancel, resubmitted: it resumes; nothing is lost or trained twice.
dotnet fsi experiments/table1.fsx --scale smoke --strategies sequential-ewc --seeds 0, --deterministic --threads 1 \
  --backend slurm --out "$T/cancel/table1" > "$T/cancel.log" 2>&1
CROOT="$T/cancel/table1/resnet34-fashion-mnist-smoke"
RUN="$CROOT/runs/sequential-ewc/seed-0"
JOB=$(sed -nE 's/.*submitted Slurm array job ([0-9]+).*/\1/p' "$T/cancel.log")
ok=1
for _ in $(seq 1 600); do ls "$RUN"/stages/*.done.json >/dev/null 2>&1 && { ok=0; break; }; sleep 0.2; done
scancel "${JOB}_0"
check "a stage finished, then scancel" $ok
sleep 3
cli sweep status "$CROOT" > "$T/status.log" 2>&1
grep -q "cancelled" "$T/status.log" && [ ! -f "$RUN/metrics.json" ]; check "sweep status shows the task cancelled, the run unfinished" $?
done_before=$(ls "$RUN"/stages/*.done.json 2>/dev/null | wc -l)
cli sweep resubmit "$CROOT" > "$T/resubmit.log" 2>&1 && grep -q "resubmitted as Slurm array job" "$T/resubmit.log"
check "sweep resubmit sends the unfinished run again" $?
wait_finished "$CROOT" 600; check "the resubmitted task finishes" $?
grep -q "resuming after stage" "$RUN/log.txt"; check "it resumed after the last finished stage ($done_before done before the cancel)" $?
# Every stage trained once: one "done" line per stage in the run's log.
twice=$(grep -oE "stage [0-9]+/[0-9]+ '[^']+' done" "$RUN/log.txt" | sort | uniq -d | wc -l)
stages=$(grep -oE "stage [0-9]+/[0-9]+ '[^']+' done" "$RUN/log.txt" | sort -u | wc -l)
total=$(ls "$RUN"/stages/*.done.json | wc -l)
[ "$twice" -eq 0 ] && [ "$stages" -eq "$total" ] && [ "$total" -ge 3 ]; check "no stage trained twice, all $total trained" $?
cmp -s "$RUN/test-logits.tensors" "$T/local/table1/resnet34-fashion-mnist-smoke/runs/sequential-ewc/seed-0/test-logits.tensors"
check "the resumed run's test logits equal the uninterrupted local run's bit for bit" $?

# 3. `earlyexit sweep plan` writes a sweep without running it; `sweep submit --backend local` runs it; collect.
(cd "$T" && cli sweep plan table1 --scale smoke --strategies joint --seeds 0, --threads 1 --out "$T/plan/table1" > "$T/plan.log" 2>&1)
PROOT="$T/plan/table1/resnet34-fashion-mnist-smoke"
[ -f "$PROOT/sweep/sweep.json" ] && [ ! -d "$PROOT/runs" ] && grep -q "planned 1 runs" "$T/plan.log"; check "sweep plan writes sweep.json and runs nothing" $?
cli sweep submit "$PROOT" --backend local --jobs 1 > "$T/plan-run.log" 2>&1 && cli sweep collect "$PROOT" > "$T/plan-collect.log" 2>&1 && [ -s "$PROOT/table1.md" ]
check "sweep submit --backend local runs it, collect writes its table" $?

# 4. Bad inputs, each a clear message.
mkdir -p "$T/bin"; ln -s "$(command -v dotnet)" "$T/bin/dotnet"
out=$(PATH="$T/bin" CI=true "$T/bin/dotnet" "$E" sweep submit "$ROOT" --backend slurm 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "sbatch not found on PATH" <<<"$out"; check "no sbatch on PATH: says so" $?
write_conf "$T/dead.conf" $((PORT + 7)) 2
out=$(SLURM_CONF="$T/dead.conf" timeout 300 dotnet "$E" sweep resubmit "$ROOT" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "could not reach the Slurm controller" <<<"$out"; check "an unreachable controller: says so, submits nothing" $?
out=$(dotnet fsi experiments/table1.fsx --scale smoke --strategies joint --seeds 0, --backend slurm --out /proc/earlyexit/table1 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "is not writable" <<<"$out"; check "a run root that is not writable: says so" $?
# A task that fails every time (its data is missing): three attempts, then status shows it failed with its log.
dotnet fsi experiments/table1.fsx --scale smoke --strategies joint --seeds 0, --data-root "$T/no-data" --backend slurm --out "$T/fail/table1" > /dev/null 2>&1
FROOT="$T/fail/table1/resnet34-fashion-mnist-smoke"
for attempt in 1 2 3; do
  for _ in $(seq 1 120); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
  [ "$attempt" -lt 3 ] && cli sweep resubmit "$FROOT" > /dev/null 2>&1
done
for _ in $(seq 1 120); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
out=$(cli sweep status "$FROOT" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "3 attempts, the most a task gets" <<<"$out" && grep -q "Fashion-MNIST" <<<"$out"
check "a task failed three times: status says so and shows its log" $?
out=$(cli sweep resubmit "$FROOT" 2>&1)
grep -q "failed 3 times; --reset to try again" <<<"$out" && grep -q "nothing to resubmit" <<<"$out"
check "resubmit leaves it out until --reset" $?

stop_daemons
sleep 1
alive=0
for f in "$T/slurmd.pid" "$T/slurmctld.pid" "$T/munge-run/munged.pid"; do
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
done
check "every daemon it started is stopped" $alive
echo "slurm: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
