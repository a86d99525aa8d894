#!/usr/bin/env bash
# Everything the benchmark issue measures on a GPU, in one go on a bare CUDA machine with PyTorch:
# the GPU tests (bf16, pipeline on cuda), speed/profile/memory/training throughput at real size, the accuracy
# ablations (runs side by side on the one GPU), then torch.compile (default mode at batch 16, CUDA graphs at
# batch 1). Each stage's results are packed into OUT_DIR as soon as it ends, so a run cut short still returns what
# it finished.
#
#   bash benchmarks/run_on_gpu.sh OUT_DIR [accuracy_ablations.py options...]
#
# Wheels in .whl/ (our pinned transformers, peft, datasets... for the machine's Python) are installed first when
# present: such machines have PyTorch but cannot reach a package index.
set -u
OUT_DIR=${1:?usage: run_on_gpu.sh OUT_DIR [ablation options]}
shift
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
# BUDGET_S bounds the whole script (a lent machine's time is short): each stage gets what is left, compile last.
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-3600} ))
left() { echo $(( DEADLINE - $(date +%s) - ${1:-0} )); }
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S), $(left) s left)"; }
pack() { tar czf "$OUT_DIR/results.tgz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.py' \
    benchmarks/results outputs/ablations 2>/dev/null; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, \
'datasets', datasets.__version__)"

# The synthetic data is built on the CPU while the GPU tests and benchmarks run.
python3 -c "from sera_training import synthetic_data; synthetic_data.build_synthetic_dataset()" \
    > "$OUT_DIR/data.log" 2>&1 &
data_pid=$!

stage "GPU tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_modeling_sera.py tests/test_pipeline_sera.py \
    -k "gpu or cuda or bf16" 2>&1 | tail -15

stage "benchmarks"
timeout $(left 330) python3 benchmarks/run_all.py --device cuda --only speed memory training 2>&1 \
    | tee "$OUT_DIR/benchmarks.log" | grep -E "^(==|\| |- )" | head -120
pack

stage "accuracy ablations"
wait "$data_pid"
timeout $(left 15) python3 benchmarks/accuracy_ablations.py --jobs 7 --threads 1 "$@" 2>&1 | tee "$OUT_DIR/ablations.log"
pack

stage "torch.compile"
[ "$(left)" -gt 60 ] && timeout $(left 5) python3 benchmarks/compile_speed.py --device cuda --batch-size 16 --repeats 10 \
    --output benchmarks/results/compile.json 2>&1 | tee benchmarks/results/compile.md | tail -20
pack

stage "torch.compile with CUDA graphs, batch 1"
[ "$(left)" -gt 90 ] && timeout $(left 5) python3 benchmarks/compile_speed.py --device cuda --batch-size 1 --repeats 10 \
    --mode reduce-overhead --output benchmarks/results/compile_reduce_overhead_b1.json 2>&1 \
    | tee benchmarks/results/compile_reduce_overhead_b1.md | tail -12
pack
stage "done"
