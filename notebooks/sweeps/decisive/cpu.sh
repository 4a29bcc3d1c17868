#!/bin/bash
# The decisive study's remaining points on this machine's CPU cores (docs/study-design.md), for sessions whose
# machine starts without the run folders of earlier sessions. In the repository root:
#   bash notebooks/sweeps/decisive/cpu.sh DEADLINE_S [FILE ...]
# builds ../study-code (a worktree at the study's frozen commit, with the sweep files written later and
# run_direct.py beside it, and Fashion-MNIST), then runs every point of FILEs (default: ablations, gn-groups, depth,
# more-seeds, gn-groups-more, in that order) that data/results/decisive/runs.csv does not hold, two at a time (JOBS=N: N), one thread each,
# none started after DEADLINE_S seconds (choose it so that a run started then ends before the session does: an
# unfinished run is lost with the machine). Before the session ends: .venv/bin/advkit study --runs
# ../study-code/runs/decisive --readme README.md, then commit the tables.
set -euo pipefail
CODE=3527c8e7332af3c442d722076a516cefdca16ee0
HERE=notebooks/sweeps/decisive
deadline=${1:?give the seconds after which no run starts}; shift
files=("$@"); [ ${#files[@]} -gt 0 ] || files=(ablations gn-groups depth more-seeds gn-groups-more)
root=$PWD; study=$(cd .. && pwd)/study-code
[ -d "$study" ] || git worktree add -q --detach "$study" "$CODE"
[ "$(git -C "$study" rev-parse HEAD)" = "$CODE" ] || { echo "$study is not at $CODE" >&2; exit 2; }
cp "$HERE"/*.yaml "$HERE"/run_direct.py "$study/$HERE/"
cd "$study"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$study  # the frozen advkit, not the venv's
py=$root/.venv/bin/python  # run from $study: its advkit (the frozen commit) comes first on the path
$py -m advkit.cli data > /dev/null
$py -c "from advkit import device; print('code', device.code_version())"
paths=(); for f in "${files[@]}"; do paths+=("$HERE/$f.yaml"); done
# --stop inf: a run started before the deadline runs to its end (run_direct's --stop defaults to the deadline,
# which would send SIGTERM to the runs still running at the deadline: their work stays only as a checkpoint)
exec $py "$HERE/run_direct.py" "${paths[@]}" --jobs "${JOBS:-2}" --deadline "$deadline" --stop inf --logs runs/direct-logs \
  --recorded "$root/data/results/decisive/runs.csv"
