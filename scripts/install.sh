#!/usr/bin/env bash
# Creates ./.venv with the matched, pinned set and installs this project into it (idempotent).
#   FUXI_GPU=1 scripts/install.sh   -> CUDA torch/fbgemm-gpu instead of the CPU builds
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.installed-$(cat requirements/cpu.lock pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ "${FUXI_GPU:-0}" = "1" ]; then
  "${pip[@]}" -r requirements/gpu.txt
  grep -v '^fbgemm-gpu-cpu' requirements/cpu.lock > "$VENV/lock.txt"
else
  # torch==2.13.0 matches the CPU build (2.13.0+cpu) where a local wheel or the PyTorch CPU index offers it.
  "${pip[@]}" torch==2.13.0
  cp requirements/cpu.lock "$VENV/lock.txt"
fi
"${pip[@]}" -r "$VENV/lock.txt"
# torchrec declares the CUDA `fbgemm-gpu` package as a requirement; its real needs are in the lock file.
"${pip[@]}" --no-deps torchrec==1.8.0
"${pip[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu; print('torch', torch.__version__, 'torchrec', torchrec.__version__)"
rm -f "$VENV"/.installed-*
touch "$stamp"
