#!/usr/bin/env bash
# Measure every GPU figure of taco_cvgl in one go, and run the GPU-only tests.
#
# On a machine with an NVIDIA GPU, from the repository root:
#   bash benchmarks/gpu_all.sh              # full figures (about 6-8 minutes on one H100/H200)
#   QUICK=1 bash benchmarks/gpu_all.sh      # fewer repetitions (about 3 minutes)
# Results go to $OUT (default ./gpu_bench_out): bench_gpu.json (the figures, the machine named),
# bench_gpu.log, tests_gpu.log and nvidia-smi.txt. The JSON is rewritten after every part, so
# a run cut short still leaves the parts it finished.
#
# A GPU machine that has PyTorch but not every package this project needs (pyproj, faiss-cpu)
# installs them from wheels in ./.whl, and uses the demo scene from ./.bench_cache when there.
# Prepare both on a machine with the registries and the project's venv, once:
#   bash benchmarks/gpu_all.sh --prepare     # fills .whl/ and .bench_cache/ (git-ignored)
# then send .whl and .bench_cache along with the working tree to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_PYTHON_VERSION=${WHEEL_PYTHON_VERSION:-3.12}
WHEELS=(pyproj==3.7.2 faiss-cpu==1.15.1)

if [[ "${1:-}" == "--prepare" ]]; then
    py=.venv/bin/python
    [[ -x $py ]] || py=python3
    mkdir -p .whl .bench_cache
    for entry in /.whl/ /.bench_cache/; do
        grep -qxF "$entry" .git/info/exclude 2>/dev/null || echo "$entry" >> .git/info/exclude
    done
    "$py" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$WHEEL_PYTHON_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    "$py" -m taco_cvgl.demo.scene --fetch >/dev/null
    "$py" - <<'PY'
import shutil
from taco_cvgl.model.config import cache_dir_default
from taco_cvgl.demo.scene import SCENE_FILE
shutil.copy2(cache_dir_default() / SCENE_FILE, '.bench_cache/' + SCENE_FILE)
PY
    du -sh .whl .bench_cache
    exit 0
fi

OUT=${OUT:-$PWD/gpu_bench_out}
source benchmarks/gpu_env.sh

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo 'nvidia-smi not available' > "$OUT/nvidia-smi.txt"
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, torchvision
print('torch', torch.__version__, 'torchvision', torchvision.__version__,
      'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else None)
PY

quick=()
[[ -n "${QUICK:-}" ]] && quick=(--quick)

# The GPU-only tests first (CUDA graphs and nvJPEG against the eager/OpenCV references).
set +e
"$PY" -m pytest -q -p no:cacheprovider test/test_fastpath.py -k 'cuda or nvjpeg' \
    > "$OUT/tests_gpu.log" 2>&1
echo "GPU tests exit code $?: $(tail -n 1 "$OUT/tests_gpu.log")"

# Every GPU figure, with its eager fp32 baseline in the same run.
"$PY" benchmarks/bench.py "${quick[@]}" --parts gpu --sizes 224,320 \
    --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
status=${PIPESTATUS[0]}
set -e
echo "bench exit code $status; results in $OUT/bench_gpu.json"
exit "$status"
