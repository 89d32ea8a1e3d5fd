#!/usr/bin/env bash
# Fingerprints of deterministic smoke runs: for every strategy and model family, the SHA-256 of the final model
# (the last stage's state) and of the cached test logits. Two commits that print the same lines train the same bits
# on this machine (same CPU, kernels and thread count); this is how a refactoring of the loop is shown to change
# nothing. The fingerprints depend on the CPU and the kernels, so they are compared on one machine, not pinned.
#
#   bash scripts/fingerprints.sh [OUT_FILE]      (build first: dotnet build -c Release)
set -euo pipefail
cd "$(dirname "$0")/.."
E=src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/earlyexit.dll
[ -f "$E" ] || { echo "build first: dotnet build -c Release" >&2; exit 1; }
out=${1:-/dev/stdout}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sha() { sha256sum "$1" | cut -c1-16; }
{
  echo "# code $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- src || echo '+changes'), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "# columns: model strategy [options] | final model sha256[0:16] | test logits sha256[0:16]"
  for model in resnet34 msdnet; do
    while read -r strategy options; do
      dir="$work/$model-$strategy${options// /}"
      # shellcheck disable=SC2086
      CI=true dotnet "$E" --threads 1 train --strategy "$strategy" --model "$model" --scale smoke --seed 3 --deterministic \
        --out "$dir" $options > "$dir.log" 2>&1 || { echo "$model $strategy $options: FAILED"; tail -5 "$dir.log"; continue; }
      last=$(ls "$dir"/stages/*.done.model | sort | tail -n 1)
      echo "$model $strategy $options | $(sha "$last") | $(sha "$dir/test-logits.tensors")"
    done <<'EOF'
joint
disjoint
mixed
branchwise
separate
sequential-ewc
sequential-lwf
sequential-lwf --lwf-teachers previous-stage
sequential-ewc-lwf
sequential-ewc-nowarmup
sequential-lwf-nowarmup
EOF
  done
} | tee "$out"
