#!/usr/bin/env bash
# Train the demo's embedder on a lent GPU with the package's own training command.
#
# The demo's 4 CPU minutes teach ConvNeXt-Tiny almost nothing (no ImageNet weights here); a few
# GPU minutes do what hours of the development CPU cannot. On the GPU machine, from the
# repository root (after `bash benchmarks/gpu_all.sh --prepare` here, with .whl and
# .bench_cache carried along):
#   bash benchmarks/gpu_train_demo.sh                 # about 6 minutes on one H100/H200
# Settings (environment): TRAIN_MINUTES (4), INPUT_SIZE (128), VIEWS_PER_PLACE (8), SEED (0),
# BATCH (128 triplets), ACCELERATOR (gpu; cpu for a dry run here), REGION_FRACTION (1.0).
# Results under $OUT (default ./gpu_train_out): demo_weights.safetensors.part-NN (the fp16
# weights in 15 MB pieces: files come back from the device machine at most 16 MiB each),
# demo_weights.sha256, train_command.txt (the exact command, seed and data), run.json, train.log.
# Back here:
#   cd OUT && cat demo_weights.safetensors.part-* > weights.safetensors && sha256sum -c demo_weights.sha256
#   taco-cvgl demo --weights weights.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_train_out}
source benchmarks/gpu_env.sh

MINUTES=${TRAIN_MINUTES:-4}
SIZE=${INPUT_SIZE:-128}
VIEWS=${VIEWS_PER_PLACE:-8}
SEED=${SEED:-0}
BATCH=${BATCH:-128}
ACCELERATOR=${ACCELERATOR:-gpu}
FRACTION=${REGION_FRACTION:-1.0}
WORK=${WORK:-/tmp/taco_demo_train}
rm -rf "$WORK"
mkdir -p "$WORK"

# The demo's own training set: tiles and simulated views of the west 60 % of the scene (the
# evaluation area, east, is never seen), from the same function `taco-cvgl demo` uses.
"$PY" - "$WORK/data" "$VIEWS" "$SEED" "$FRACTION" <<'PY'
import sys
from pathlib import Path
from taco_cvgl.demo.scene import load_scene, split_regions
from taco_cvgl.cli.demo import FOOTPRINT_PX, make_training_set, middle_rows
out, views, seed, fraction = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
scene = load_scene()
train_region, _ = split_regions(scene, 0.6, gap_px=FOOTPRINT_PX)
csv_path = make_training_set(scene, middle_rows(train_region, fraction), out, views, seed)
print(f'training set: {sum(1 for _ in open(csv_path)) - 1} images in {out}')
PY

cmd=("$PY" -m taco_cvgl.cli.main train --out "$WORK/run" --train-dir "$WORK/data"
     --train-csv "$WORK/data/train.csv" --pos-radius-m 720 --neg-radius-m 2880
     --input-size "$SIZE" --normalization per_image --backbone-weights none --rotate
     --batch-size "$BATCH" --max-epochs 1000 --max-minutes "$MINUTES" --lr 1e-3
     --warmup-epochs 1 --seed "$SEED" --threshold-m 1440 --accelerator "$ACCELERATOR"
     --devices 1 --precision auto --no-validate-first --no-progress)
{
    echo "# $(date -u +%FT%TZ) on $(hostname)"
    "$PY" -c 'import torch; print("# torch", torch.__version__, "gpu",
              torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    echo "# data: taco_cvgl.cli.demo.make_training_set(scene, west 60 % (middle $FRACTION" \
         "of rows), views_per_place=$VIEWS, seed=$SEED) on the Landsat-8 scene of the demo"
    echo "${cmd[*]}"
} > "$OUT/train_command.txt"
set +e
"${cmd[@]}" 2>&1 | tee "$OUT/train.log"
status=${PIPESTATUS[0]}
set -e
cp "$WORK/run/run.json" "$OUT/run.json" 2>/dev/null || true
if [[ $status -ne 0 || ! -f $WORK/run/weights.safetensors ]]; then
    echo "training failed (exit $status); see $OUT/train.log"
    exit 1
fi
(cd "$WORK/run" && sha256sum weights.safetensors) > "$OUT/demo_weights.sha256"
split -b 15M -d "$WORK/run/weights.safetensors" "$OUT/demo_weights.safetensors.part-"
ls -l "$OUT"
