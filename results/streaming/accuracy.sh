#!/usr/bin/env bash
# Streaming vs in-memory on the same generated 2,000-image folder (10 classes, 16x16 PNGs, 400 test
# images): resnet8, 15 epochs, seeds 0-2, one thread each, one run at a time.
set -euo pipefail
OUT=${1:-runs/streaming-accuracy}
pnnh data make-folder "$OUT/data" --train 2000 --test 400   # the same make_image_folder call
for seed in 0 1 2; do
  for stream in stream no-stream; do
    OMP_NUM_THREADS=1 pnnh train --model resnet8 --data folder --data-dir "$OUT/data" --img-size 16 \
      --epochs 15 --seed $seed --$stream --workers 2 --device cpu --out "$OUT/$stream-s$seed"
  done
done
