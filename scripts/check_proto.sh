#!/usr/bin/env bash
# Fails if the generated code in kvmesh_pb/ differs from what proto/ generates now.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
bash "$root/scripts/gen_proto.sh" "$tmp"
stale=0
while IFS= read -r f; do
  cmp -s "$tmp/$f" "$root/$f" || { echo "stale or missing: $f"; stale=1; }
done < <(cd "$tmp" && find kvmesh_pb -type f ! -name '*.pyc' | sort)
# Files in the repo's kvmesh_pb/ that proto/ no longer produces.
while IFS= read -r f; do
  [ -e "$tmp/$f" ] || { echo "orphaned generated file: $f"; stale=1; }
done < <(cd "$root" && find kvmesh_pb -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | sort)
if [ $stale -ne 0 ]; then echo "generated code is stale: run 'make proto' and commit"; exit 1; fi
echo "generated code is up to date"
