#!/usr/bin/env bash
# Benchmark several commits in one GPU call, to find which one changed a figure.
# Usage: tools/bisect_bench.sh REV [REV ...] -- [jax_ep.bench arguments]
#   e.g. tools/bisect_bench.sh e9d6e47 088d346 HEAD -- --shapes deepep --backends cuda
# Each REV is checked out into its own worktree under /tmp, built there
# (pip install -e, against the machine's jax) and benchmarked, in the order
# given; the current tree is reinstalled at the end. Output: one table per REV
# (also in $OUT/bisect_REV.log when $OUT is set).
# The device machine gets the working tree without .git: export the revisions
# here first (tools/bisect_bench.sh --export REV ...: into .bisect/REV, which
# git ignores), name .bisect in the run's carry, and pass the REVs as usual
# there; a REV with a .bisect/REV folder is benchmarked from that folder.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--export" ]; then
  shift
  for rev in "$@"; do
    rm -rf ".bisect/$rev" && mkdir -p ".bisect/$rev"
    git archive "$rev" | tar -x -C ".bisect/$rev" || exit 1
    echo "exported $rev ($(git rev-parse --short "$rev")) to .bisect/$rev"
  done
  exit 0
fi
revs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do revs+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the --
[ ${#revs[@]} -gt 0 ] || { echo "usage: $0 REV [REV ...] -- [bench args]"; exit 2; }
PY=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
here=$(pwd)
status=0
for rev in "${revs[@]}"; do
  if [ -d ".bisect/$rev" ]; then
    sha=$rev wt=$here/.bisect/$rev
    echo "=== $rev (exported tree)"
  else
    sha=$(git rev-parse --short "$rev") || { status=1; continue; }
    wt=/tmp/jax_ep_bisect_$sha
    rm -rf "$wt"
    git worktree add -f --detach "$wt" "$sha" >/dev/null 2>&1 || { echo "$rev: no worktree"; status=1; continue; }
    echo "=== $rev ($sha): $(git log -1 --format=%s "$sha" | cut -c1-100)"
  fi
  (cd "$wt" && $PY -m pip install --no-build-isolation --no-deps -e . >/tmp/bisect_build_$sha.log 2>&1) \
    || { tail -20 "/tmp/bisect_build_$sha.log"; status=1; continue; }
  log=${OUT:+$OUT/bisect_$sha.log}
  (cd "$wt" && JAX_PLATFORMS=cuda timeout 300 $PY -m jax_ep.bench "$@") 2>&1 \
    | tee ${log:-/dev/null} | tail -6
  [ -d "$here/.bisect/$rev" ] || git worktree remove --force "$wt" >/dev/null 2>&1
done
$PY -m pip install --no-build-isolation --no-deps -e "$here" >/dev/null 2>&1 || status=1
exit $status
