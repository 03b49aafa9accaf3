#!/usr/bin/env bash
# One-command GPU check (about 5 minutes on one GPU): short runs of the demo recipe and of ViT-S/16
# under --precision auto through ./launch (nccl), a resume, eval_knn.py, one epoch of eval_linear.py,
# and the training step's images/s; one summary line per check. Without a CUDA GPU it says it
# skipped and exits 0.
#
#     bash bench/gpu_check.sh [OUTPUT_DIR]        # default: a fresh temporary folder
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: skipped (no CUDA GPU visible to torch on this machine)"
    exit 0
fi
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'x', torch.cuda.device_count(), \
'capability', torch.cuda.get_device_capability(), 'torch', torch.__version__)"
"$PY" -c "import torch; from simpool.precision import resolve_precision; \
print('gpu_check:', resolve_precision('auto', torch.device('cuda')).log_line())"
failed=0

check() {  # check NAME COMMAND...: run it, log to OUT/NAME.log, print one line
    local name=$1; shift
    local start=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "gpu_check: $name ok ($((SECONDS - start)) s) $(summary "$name")"
    else
        echo "gpu_check: $name FAILED ($((SECONDS - start)) s), see $OUT/$name.log: $(tail -n 1 "$OUT/$name.log")"
        failed=1
    fi
}

summary() {  # the figure of a check's log
    case $1 in
        demo|demo_resume) grep -o "before training.*points)" "$OUT/$1.log" | tail -n 1 ;;
        vit_small) grep -o "Epoch \[1/1\] done in [^ ]* ([^)]*)" "$OUT/$1.log" | tail -n 1 ;;
        knn) grep -A 3 "Weighted k-NN" "$OUT/$1.log" | tail -n 1 | tr -s ' ' ;;
        linear) grep -o "top-1 [0-9.]*%" "$OUT/$1.log" | tail -n 1 ;;
        step_*) grep -E "step: |FLOPs:" "$OUT/$1.log" | tr -s ' ' | tr '\n' ' ' ;;
    esac
}

# the demo recipe (Fashion-MNIST, k-NN before and after) on every GPU of this node
check demo ./launch --nproc_per_node "$NGPU" main_dino.py --output_dir "$OUT/demo" --saveckp_freq 1
# resume: one more epoch from the checkpoint just written
check demo_resume ./launch --nproc_per_node "$NGPU" main_dino.py --output_dir "$OUT/demo" --epochs 2 \
    --eval_every 1
# ViT-S/16 at 224/96 px on 2048 Fashion-MNIST images (upsampled), one epoch
check vit_small ./launch --nproc_per_node "$NGPU" main_dino.py --data_path fashion-mnist --subset 205 \
    --arch vit_small --patch_size 16 --global_crops_size 224 --local_crops_size 96 --local_crops_number 6 \
    --batch_size_per_gpu 64 --epochs 1 --warmup_epochs 0 --eval_every 0 --output_dir "$OUT/vit_small"
check knn ./launch --nproc_per_node "$NGPU" eval_knn.py --pretrained_weights "$OUT/demo/checkpoint.pth" \
    --data_path fashion-mnist --output_dir "$OUT/knn"
check linear ./launch --nproc_per_node "$NGPU" eval_linear.py --pretrained_weights "$OUT/demo/checkpoint.pth" \
    --data_path fashion-mnist --epochs 1 --output_dir "$OUT/linear"
check step_demo "$PY" bench/train_step.py --demo --steps 10 --warmup 3
check step_vit_small "$PY" bench/train_step.py --data_path synthetic --arch vit_small --patch_size 16 \
    --batch_size_per_gpu 64 --global_crops_size 224 --local_crops_size 96 --local_crops_number 6 \
    --out_dim 65536 --steps 10 --warmup 3
echo "gpu_check: $([ $failed = 0 ] && echo 'all checks passed' || echo 'some checks FAILED'); logs in $OUT"
exit $failed
