#!/bin/bash
# Issue 19 at the confirmation budget (the full 60k/10k Fashion-MNIST split, 10 epochs, 3 seeds,
# --compile, as configs/pnnh-confirmation.yaml): the review variants' cells only. The reference
# cells (pnnh, resnet; trained-coder's "frozen" is pnnh) are the confirmation study's records
# (results/confirmation/results.csv, same recipe and seeds), so --only leaves them out, and
# compare.py pairs the new cells with them by seed. About 45 one-thread hours in all (about 10 left
# after session 13).
# Two one-thread processes side by side on a 2-core machine, from the repository root:
#   nohup bash results/review-confirmation/run.sh > runs/review-confirmation-A.log 2>&1 &
#   nohup bash results/review-confirmation/run.sh > runs/review-confirmation-B.log 2>&1 &
# The two never train the same cell (cell locks); re-running resumes every cell from its last
# checkpoint (each epoch's end, and every 50 steps inside an epoch). Then:
#   python results/review-confirmation/compare.py runs/review-*-confirmation > results/review-confirmation/compare.md
cd "$(dirname "$0")/../.." && source .venv/bin/activate
export OMP_NUM_THREADS=1
run() {
  pnnh sweep --config "configs/review-$1-confirmation.yaml" --out "runs/review-$1-confirmation" --compile \
    --checkpoint-every 50 --only "$2"
}
run resnet110-zero-init resnet-zero-init        # objection 4:  3 cells x ~65 min (done, session 9)
run plain-forms looks-linear-d56-s0,looks-linear-d56-s1,looks-linear-d56-s2  # objection 1 at 56 (done, session 10)
run resnet110-zero-init-tuned resnet-zero-init-tuned  # objection 4 at its depth-110 lr: 3 cells x ~65 min (done, sessions 10-11)
run plain-forms code-bn-d56-s0,code-bn-d56-s1,code-bn-d56-s2  # objection 1 at 56, BN on the code: 3 cells x ~55 min (done, sessions 10-11)
run plain-forms looks-linear,code-bn             # objection 1 at 110: 6 cells x ~105 min (all done, session 13)
run trained-coder coder-lr1e-3,coder-lr1e-2,coder-lr1e-1   # objection 5: 9 cells x ~25 min
run matched-params resnet-w11,resnet-w12,pnnh-w22,pnnh-w23 # objection 3: 12 cells x 20-40 min
echo REVIEW_CONFIRMATION_DONE
