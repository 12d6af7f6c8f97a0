#!/usr/bin/env bash
# The GPU check (issue 12): bench/gpu_check.py on a machine with an NVIDIA GPU and nothing
# else reachable, CPU figures beside.  Two steps:
#
#   bash bench/gpu_check.sh prepare   # here, in the repo: what travels to the GPU machine
#                                     # goes to .device/ (git-ignored, ~48 MB): MiniLM in
#                                     # fp16 and real item texts (amazon-gift-cards, rees46)
#   bash bench/gpu_check.sh run       # there (or here with --cpu): about 2-4 minutes
#
# With this project's `device` tool: prepare here, then one call, carrying .device:
#   run(command="bash bench/gpu_check.sh run", carry=[".device"], timeout_s=480)
# and commit what it wrote to $OUT as bench/results/gpu-check.json.  The GPU machine's
# python3 has torch, transformers and numpy, which is all gpu_check.py imports.
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-run}"
shift || true
case "$step" in
  prepare)
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p .device
    "$PY" - <<'PYEOF'
import shutil
from pathlib import Path
import torch
from transformers import AutoModel, AutoTokenizer
from ranking.encoder import default_model_path
src, dst = default_model_path(), Path(".device/minilm")
model = AutoModel.from_pretrained(str(src), local_files_only=True).half()
model.save_pretrained(dst, safe_serialization=True)
AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(dst)
for ds in ("amazon-gift-cards-2018", "rees46-sample"):
    shutil.copyfile(Path("..") / "shared" / "data" / ds / "items.jsonl.gz", Path(".device") / f"{ds}.jsonl.gz")
print("prepared .device:", sum(f.stat().st_size for f in Path(".device").rglob("*") if f.is_file()) // 2**20, "MiB")
PYEOF
    ;;
  run)
    PY=${PYTHON:-python3}
    out="${OUT:-bench/results}"
    mkdir -p "$out"
    PYTHONUNBUFFERED=1 PYTHONPATH=. "$PY" -m bench.gpu_check \
      --minilm .device/minilm --texts .device/*.jsonl.gz --json "$out/gpu-check.json" "$@"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh prepare|run [gpu_check.py options]" >&2
    exit 2
    ;;
esac
