#!/usr/bin/env bash
# The checks that need a GPU, in one prepared run (under 10 minutes), for a session lent one:
#   1. the default trainer on CUDA (bf16): steps/s and peak GPU memory (bench_trainer.py --device cuda);
#   2. a short supervised training run on CUDA: what the supervisor's diagnosis shows of the GPU;
#   3. a 1-rank NCCL job that hangs after some collectives, under the supervisor: the NCCL flight
#      recorder dump is collected on the stall and torchfrtrace (or a pickle load) reads it.
# Everything it finds is printed and written under ${OUT:-gpu-check}/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
if [ ! -x .venv/bin/python ]; then
    source bin/_setup.sh >/dev/null
fi
PY=.venv/bin/python
export PYTHONPATH="$PWD"

echo "== nvidia-smi"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.version.cuda)'
$PY -m pip install --quiet nvidia-ml-py >/dev/null 2>&1 && echo "nvidia-ml-py installed (GPU stats in the diagnosis)"

echo "== 1. trainer steps/s and peak memory on CUDA"
timeout 240 $PY bench/bench_trainer.py --device cuda 2>&1 | tee "$OUT/bench_trainer_cuda.txt"

echo "== 2. supervised training on CUDA, one injected hang: the diagnosis's GPU rows"
rm -rf "$OUT/run"
timeout 180 $PY -m supervisor --run-dir "$OUT/run" --stall-timeout 20 --kill-grace 10 --on-stall kill \
    -- $PY -u trainer/train.py --device cuda --epochs 1 --fault hang:30 > "$OUT/run.out" 2>&1
echo "status $?"
grep -E "gpu=|GPU|diagnosis:" "$OUT/run/supervise.log" | head -20
$PY - "$OUT/run/events.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["event"] == "diagnosis":
        print("diagnosis gpus:", e["gpus"])
EOF

echo "== 3. a 1-rank NCCL job that hangs after some collectives: the flight recorder"
cat > "$OUT/nccl_hang.py" <<'EOF'
import os, threading, time
import torch
import torch.distributed as dist
dist.init_process_group("nccl")
x = torch.ones(1024, device="cuda")
for step in range(20):
    dist.all_reduce(x)
torch.cuda.synchronize()
progress = os.environ["MAGVIT_PROGRESS_FILE"]
open(progress, "w").write("20 all_reduces done\n")
print("collectives done; now hanging with the process group alive", flush=True)
threading.Event().wait()
EOF
rm -rf "$OUT/nccl"
timeout 200 $PY -m supervisor --run-dir "$OUT/nccl" --stall-timeout 15 --kill-grace 5 \
    -- .venv/bin/torchrun --standalone --nproc-per-node 1 "$OUT/nccl_hang.py" > "$OUT/nccl.out" 2>&1
echo "status $?"
grep -E "flight recorder|torchfrtrace|rank_" "$OUT/nccl/supervise.log" | head -20
ls -la "$OUT/nccl/flight-recorder"/attempt-0/ 2>&1
$PY - "$OUT/nccl/flight-recorder/attempt-0" <<'EOF'
import glob, os, pickle, sys
dumps = sorted(glob.glob(os.path.join(sys.argv[1], "rank_*")))
print("dumps:", dumps)
for path in dumps:
    with open(path, "rb") as f:
        d = pickle.load(f)
    entries = d.get("entries", [])
    print(path, "version", d.get("version"), "entries", len(entries),
          "last:", entries[-1].get("profiling_name") if entries else None)
EOF
echo "== done; outputs in $OUT/"
