#!/usr/bin/env bash
# The project's test command: builds the solution (Release, linux-x64) and runs both Expecto executables (the
# properties twice: on the threads auto gives and on 1 thread), then the end-to-end checks.
# Ends with one plain line "N passed, N failed" and a non-zero exit code on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! dotnet build EarlyExit.sln -c Release -nologo -v q -clp:ErrorsOnly; then
  echo "build failed"
  echo "0 passed, 1 failed"
  exit 1
fi

passed=0; failed=0; status=0
# The properties run twice: on the threads auto gives, and on 1 thread, where a ResNet trains channels-last
# (ConvolutionLayout.Training) and every training path meets that layout.
for run in Golden Properties Properties:1; do
  suite=${run%%:*}
  threads=${run#*:}; [ "$threads" = "$run" ] && threads=${EARLYEXIT_THREADS:-auto}
  log=$(mktemp)
  [ "$run" != "$suite" ] && echo "== $suite on $threads thread(s) =="
  EARLYEXIT_THREADS=$threads dotnet "tests/$suite/bin/Release/net10.0/linux-x64/EarlyExit.Tests.$suite.dll" --summary --no-spinner --colours 0 "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  line=$(grep -aE '^[a-z]+: [0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
  if [ -z "$line" ]; then
    echo "$suite: no summary line (the test executable crashed, exit code $rc)"
    failed=$((failed + 1)); status=1
  else
    p=$(sed -E 's/^[a-z]+: ([0-9]+) passed, ([0-9]+) failed.*/\1/' <<<"$line")
    f=$(sed -E 's/^[a-z]+: ([0-9]+) passed, ([0-9]+) failed.*/\2/' <<<"$line")
    passed=$((passed + p)); failed=$((failed + f))
    [ "$rc" -ne 0 ] && status=1
  fi
  rm -f "$log"
done
# One end-to-end check: NAME, then whether it passed (0) or not, then its log (printed when it failed).
report() {
  if [ "$2" -eq 0 ]; then
    echo "$1: 1 passed, 0 failed"
    passed=$((passed + 1))
  else
    echo "$1: FAILED; its log:"
    tail -n 30 "$3"
    failed=$((failed + 1)); status=1
  fi
}
# End to end: the Table 1 experiment (all seven strategies, two seeds, through the local executor) at smoke scale on
# (four tables of 8 rows: budgets, exits, budgets fitted on validation, calibration)
# real data (Fashion-MNIST), for every model family, with its claims file; half a minute each.
if [ -z "${EARLYEXIT_SKIP_SMOKE:-}" ]; then
  for model in resnet34 msdnet; do
    smoke=$(mktemp -d)
    dotnet fsi experiments/table1.fsx --scale smoke --model "$model" --out "$smoke/table1" > "$smoke/log" 2>&1 \
      && [ "$(grep -c "^| " "$smoke"/table1/*/table1.md)" -eq 32 ] && [ -s "$smoke"/table1/*/fig2.png ] \
      && grep -q "| 2 |" "$smoke"/table1/*/table1.md && [ -s "$smoke"/claims-fashion-mnist-smoke.md ]
    report "table1 smoke ($model)" $? "$smoke/log"
    rm -rf "$smoke"
  done
fi
# The training-dynamics experiment (joint, disjoint, mixed with gradients, ranks, landscapes and paths) at smoke scale.
if [ -z "${EARLYEXIT_SKIP_SMOKE:-}" ]; then
  smoke=$(mktemp -d)
  dotnet fsi experiments/dynamics.fsx --scale smoke --threads 1 --out "$smoke/dynamics" > "$smoke/log" 2>&1 \
    && grep -q "^## Mode connectivity" "$smoke"/dynamics/*/dynamics.md && [ -s "$smoke"/dynamics/*/analysis/connectivity-disjoint-mixed.png ] \
    && [ -s "$smoke"/dynamics/*/analysis/landscape-joint-exit1.png ] && grep -q "| mixed | joint | segment 1 |" "$smoke"/dynamics/*/dynamics.md
  report "dynamics smoke" $? "$smoke/log"
  rm -rf "$smoke"
fi
# The samples: a network of one's own on one's own images (written from Fashion-MNIST by the F# script), through the
# recipes and runner (F# script), the C# core (console app), and the command line with the C# app as its plugin.
if [ -z "${EARLYEXIT_SKIP_SMOKE:-}" ]; then
  smoke=$(mktemp -d)
  plugin=samples/CustomModel.CSharp/bin/Release/net10.0/linux-x64/CustomModel.CSharp.dll
  ee() { dotnet src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/earlyexit.dll --plugin "$plugin" "$@"; }
  { dotnet fsi samples/custom-model.fsx --out "$smoke" \
      && dotnet samples/CustomModel.CSharp/bin/Release/net10.0/linux-x64/CustomModel.CSharp.dll "$smoke/images" 1 5 \
      && ee models | grep tinycnn \
      && ee train --strategy sequential-ewc --model tinycnn --data image-folder --data-root "$smoke/images" --scale smoke --out "$smoke/cli" \
      && ee eval "$smoke/cli" --timing-samples 16 \
      && { ee eval "$smoke/cli" --timing-samples -1; [ $? -eq 2 ]; } \
      && ee export "$smoke/cli" --format pt; } > "$smoke/log" 2>&1 \
    && grep -q "^exit 3: test accuracy" "$smoke/log" && grep -q "^test accuracy per exit" "$smoke/log" \
    && grep -q "^error: --timing-samples -1: give a count" "$smoke/log" \
    && [ -s "$smoke/cli/export/model.pt" ] && [ -s "$smoke/run/metrics.json" ]
  report "samples (own network and images: F# script, C# app, command line with a plugin)" $? "$smoke/log"
  rm -rf "$smoke"
fi
# The packages as a user gets them: packed into a local folder feed, both samples built outside the repository against
# them and run, the earlyexit tool installed from the feed and run with the C# sample as its plugin (a few minutes).
if [ -z "${EARLYEXIT_SKIP_SMOKE:-}" ] && [ -z "${EARLYEXIT_SKIP_PACKAGES:-}" ]; then
  work=$(mktemp -d)
  bash scripts/packages-test.sh "$work/pkg" > "$work/log" 2>&1
  report "packages (dotnet pack; the samples against the packages; the tool from the feed)" $? "$work/log"
  rm -rf "$work"
fi
# The benchmark harness, at smoke size (seconds): every figure is produced and written (29, and training throughput
# under each convolution backend of this CPU, at least default and no-onednn; the training layout on 1 thread and on
# all cores, one row each (one in all on a 1-core machine); and, where Debian's python3-torch is
# installed, the 14 of the PyTorch peer at one thread, its training step by phase, batch-1 profile and oneDNN convolution profile included),
# as readable JSON (no \u00XX escapes of '+' or apostrophes); its numbers mean nothing.
if [ -z "${EARLYEXIT_SKIP_SMOKE:-}" ]; then
  bench=$(mktemp -d)
  pytorch_expected=0
  /usr/bin/python3 -c "import torch" >/dev/null 2>&1 && pytorch_expected=14
  dotnet bench/EarlyExit.Bench/bin/Release/net10.0/linux-x64/EarlyExit.Bench.dll --smoke --out "$bench" > "$bench/log" 2>&1 \
    && perbackend=$(grep -c '"Name": "training images/s with' "$bench/bench.json") \
    && pytorch=$(grep -c '"Name": ".*PyTorch' "$bench/bench.json") \
    && layout=$(grep -c '"Name": "training images/s on [0-9]* thread(s): channels-last / NCHW' "$bench/bench.json") \
    && [ "$perbackend" -ge 2 ] && [ "$layout" -ge 1 ] && [ "$layout" -le 2 ] \
    && [ "$(( $(grep -c '"Name"' "$bench/bench.json") - perbackend - pytorch - layout ))" -eq 29 ] \
    && [ "$pytorch" -eq "$pytorch_expected" ] \
    && grep -q "^| trainer step" "$bench/bench.md" && grep -q "^Numerics: CPU " "$bench/bench.md" \
    && grep -q '"Name": "sequential + EWC step' "$bench/bench.json" && ! grep -q '\\u00' "$bench/bench.json"
  report "bench smoke" $? "$bench/log"
  rm -rf "$bench"
fi

# The Slurm backend on a real single-node cluster started for the test (installs slurm-wlm and munge when missing; needs
# root or sudo); about a minute.
if [ -z "${EARLYEXIT_SKIP_SMOKE:-}" ] && [ -z "${EARLYEXIT_SKIP_SLURM:-}" ]; then
  slurmlog=$(mktemp)
  bash scripts/slurm-test.sh > "$slurmlog" 2>&1
  report "slurm backend (single-node cluster)" $? "$slurmlog"
  rm -f "$slurmlog"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] || status=1
exit $status
