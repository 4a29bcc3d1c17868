#!/bin/bash
# The decisive study's seeds on a GPU (docs/study-design.md, "Seeds on a GPU"), in two steps:
#   bash notebooks/sweeps/decisive/gpu.sh prepare          here, in the repository root: builds .study/ (ignored)
#   bash notebooks/sweeps/decisive/gpu.sh run START STOP   on the GPU machine (device tool: carry .study)
# (a rehearsal here: PYTHON=$PWD/.venv/bin/python OUT=/tmp/out bash ... run 10 15: runs start, then are stopped)
# `prepare` puts into .study/: the study's frozen code (commit 3527c8e, a git checkout so that every run records its
# commit) with the sweep files written later and run_direct.py beside it, Fashion-MNIST's .gz files and the pinned
# torchattacks wheel (AutoAttack). `run` prepares the data, runs gpu-main.yaml, then gpu-ablations.yaml and
# gpu-depth.yaml, 12 runs at once, none started after START seconds, those still running stopped at STOP, and
# writes $OUT/runs.tgz (the run folders without checkpoints), logs.tgz and direct.log. Back here:
# tar xzf runs.tgz -C ../study-code (the frozen worktree), then advkit study (docs/study-design.md).
set -euo pipefail
CODE=3527c8e7332af3c442d722076a516cefdca16ee0
HERE=notebooks/sweeps/decisive
case "${1:-}" in
  prepare)
    rm -rf .study && mkdir -p .study/gz .study/whl
    grep -qx '/.study/' .git/info/exclude || echo '/.study/' >> .git/info/exclude
    git init -q .study/code && git -C .study/code fetch -q --depth 1 "$PWD" "$CODE"
    git -C .study/code checkout -q FETCH_HEAD
    cp "$HERE"/*.yaml "$HERE"/run_direct.py .study/code/$HERE/
    (cd .study/code && git ls-files -z advkit | xargs -0 sha256sum > ../advkit.sha256)  # for a machine without git
    cp /usr/share/datasets/fashion-mnist/*.gz .study/gz/
    .venv/bin/python -m pip download -q --no-deps -d .study/whl torchattacks==3.5.1
    du -sh .study ;;
  run)
    start=${2:?give the seconds after which no run starts}; stop=${3:?give the seconds at which runs are stopped}
    out=${OUT:-/tmp/study-out}; mkdir -p "$out"
    py=${PYTHON:-python3}  # the device's python3 holds PyTorch; elsewhere give PYTHON=/path/to/python
    $py -m pip install -q --no-index --no-deps --target /tmp/site .study/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/.study/code ADVKIT_DATA=$PWD/.study/data PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # 12 runs on 16 cores, as the CPU sweeps run theirs: one thread each
    cd .study/code
    if ! command -v git > /dev/null; then  # the runs record their commit through git: answer for it only where
      sha256sum --quiet -c ../advkit.sha256  # every file of advkit/ is verifiably the commit's (set -e stops here)
      mkdir -p /tmp/gitshim && printf '#!/bin/sh\ncase "$*" in *rev-parse*) echo %s;; esac\n' "$CODE" > /tmp/gitshim/git
      chmod +x /tmp/gitshim/git && export PATH=/tmp/gitshim:$PATH && echo "no git here: advkit/ verified as $CODE"
    fi
    $py -c "from advkit import data, device; data.prepare_fashion_mnist(download=False, system_dir='../gz'); \
print('code', device.code_version())"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    $py $HERE/run_direct.py $HERE/gpu-main.yaml $HERE/gpu-ablations.yaml $HERE/gpu-depth.yaml --jobs 12 \
      --deadline "$start" --stop "$stop" --logs runs/direct-logs 2>&1 | tee "$out/direct.log" || true
    $py -c "import pathlib, shutil; from advkit.rundir import RunDir
left = [d for d in pathlib.Path('runs/decisive').glob('gpu-*/*') if d.is_dir() and not RunDir(d).finished()]
[shutil.rmtree(d) for d in left]; print('unfinished runs discarded:', len(left))" | tee -a "$out/direct.log"
    tar czf "$out/runs.tgz" --exclude=checkpoints --exclude=direct-logs runs  # ~20-45 kB a run
    tar czf "$out/logs.tgz" runs/direct-logs ;;  # each run's log and config, apart (the 16 MiB limit a file)
  *)
    echo "usage: gpu.sh prepare | gpu.sh run START STOP" >&2; exit 2 ;;
esac
