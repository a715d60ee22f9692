#!/usr/bin/env bash
# Build (or reuse) the ComfyUI v0.29.0 test environment for tests/integration, from the vendored tarball.
# Usage: bash tests/integration/setup_comfyui.sh [ROOT]   (ROOT defaults to $HOME/.cache/hadakron-comfy)
# Prints the ComfyUI folder and the venv's python on its last line: "COMFYUI_PATH=... COMFYUI_PYTHON=...".
# Reuses ROOT/ComfyUI and ROOT/venv when they exist and import; rebuilds only what is missing or broken.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
ROOT="${1:-${HADAKRON_COMFY_ROOT:-$HOME/.cache/hadakron-comfy}}"
TARBALL="${COMFYUI_TARBALL:-$REPO_ROOT/../shared/vendor/comfyui-v0.29.0-4f874c5e.tar.gz}"
COMFY_DIR="$ROOT/ComfyUI"
VENV="$ROOT/venv"
PY="$VENV/bin/python"
STAMP="$ROOT/.venv-ok"
mkdir -p "$ROOT"

if [ ! -f "$COMFY_DIR/comfy/model_management.py" ]; then
  [ -f "$TARBALL" ] || { echo "setup_comfyui: no ComfyUI tarball at $TARBALL (set COMFYUI_TARBALL)" >&2; exit 2; }
  rm -rf "$COMFY_DIR" "$ROOT/unpack.tmp"
  mkdir -p "$ROOT/unpack.tmp"
  tar -xzf "$TARBALL" -C "$ROOT/unpack.tmp"
  mv "$ROOT/unpack.tmp/ComfyUI" "$COMFY_DIR"
  rm -rf "$ROOT/unpack.tmp" "$STAMP"
fi

venv_ok() {
  [ -f "$STAMP" ] && [ -x "$PY" ] && "$PY" -c "import torch, torchvision, torchaudio, safetensors, aiohttp, pytest, einops, lycoris" >/dev/null 2>&1
}

if ! venv_ok; then
  rm -rf "$VENV" "$STAMP"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  PIP="$PY -m pip --disable-pip-version-check --quiet"
  $PIP install torch==2.14.1 torchvision==0.29.1          # local wheels here; runs on CPU
  $PIP install --no-deps torchaudio==2.11.1
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY_DIR/requirements.txt" > "$ROOT/req.txt"
  printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$ROOT/cons.txt"
  $PIP install -r "$ROOT/req.txt" -c "$ROOT/cons.txt"
  $PIP install pytest einops toml tqdm -c "$ROOT/cons.txt"
  $PIP install --no-deps lycoris-lora==4.1.3
  touch "$STAMP"
fi
# hadakron itself is never installed into this venv: the server loads it as a custom node from the checkout,
# and the tests put the checkout on sys.path.
echo "COMFYUI_PATH=$COMFY_DIR COMFYUI_PYTHON=$PY"
