#!/usr/bin/env bash
# Reproduce the ComfyUI v0.29.0 test environment used by tests/integration (not run by CI).
# Usage: bash tests/integration/setup_comfyui.sh [COMFY_DIR=/work/ComfyUI] [VENV=/work/comfyui-venv]
# Needs: the bare mirror of ComfyUI v0.29.0 (MIRROR) and a pip that can reach torch 2.14.1 / torchvision 0.29.1.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
COMFY_DIR="${1:-/work/ComfyUI}"
VENV="${2:-/work/comfyui-venv}"
MIRROR="${MIRROR:-/work/.mirror/silveroxides+ComfyUI/repo}"

if [ ! -f "$COMFY_DIR/comfy/model_management.py" ]; then
  git clone --no-checkout "$MIRROR" "$COMFY_DIR"
  # Two tokenizer blobs (llama_tokenizer/tokenizer.json, qwen35_tokenizer/vocab.json) are absent from the
  # mirror: check out every other path. SDXL and Anima do not use them.
  git -C "$COMFY_DIR" ls-tree -r --name-only HEAD \
    | grep -v -e 'llama_tokenizer/tokenizer.json' -e 'qwen35_tokenizer/vocab.json' \
    | (cd "$COMFY_DIR" && xargs -d '\n' git checkout HEAD --)
fi

python -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install torch==2.14.1 torchvision==0.29.1          # runs on CPU
"$PIP" install --no-deps torchaudio==2.11.1
grep -v -E '^(torch|torchvision|torchaudio)$' "$COMFY_DIR/requirements.txt" > "$VENV/comfy-requirements.txt"
"$PIP" install -r "$VENV/comfy-requirements.txt"
"$PIP" install pytest einops toml tqdm
"$PIP" install --no-deps lycoris-lora==4.1.3
"$PIP" install --no-deps -e "$REPO_ROOT"

(cd "$COMFY_DIR" && "$VENV/bin/python" main.py --cpu --quick-test-for-ci)
echo "ComfyUI env ready. Run: COMFYUI_PATH=$COMFY_DIR $VENV/bin/python -m pytest tests/integration -q"
