#!/usr/bin/env bash
# LoRA-Lab's two commands on a fresh machine:
#   bash dev.sh run    set everything up, fetch the demo model, open the app on it
#   bash dev.sh test   set everything up, run the test suite
# Idempotent: each step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=$VENV/bin/python

# Debian/Ubuntu packages: Mesa lavapipe (a Vulkan adapter on GPU-less machines), the loader, and what Qt's xcb /
# offscreen platforms dlopen; Xvfb to show a real window where there is no display.
SYSTEM_PACKAGES="mesa-vulkan-drivers libvulkan1 libegl1 libgl1 libopengl0 libxkbcommon0 libxkbcommon-x11-0
  libfontconfig1 libfreetype6 libdbus-1-3 libglib2.0-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
  libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxrender1 libxi6 xvfb xauth"

system_packages() {
  command -v dpkg >/dev/null || { echo "note: not a Debian-family system; install the Vulkan driver, EGL and xcb libraries yourself"; return; }
  local missing=""
  for p in $SYSTEM_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  [ -z "$missing" ] && return
  if [ "$(id -u)" = 0 ]; then
    echo "installing system packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "LoRA-Lab needs these system packages. Run, then run this command again:"
    echo "  sudo apt-get install -y$missing"
    exit 1
  fi
}

python_env() {
  local stamp=$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)
  [ -f "$stamp" ] && return
  command -v python3 >/dev/null || { echo "python3 (3.11 or newer) is needed"; exit 1; }
  [ -x "$PY" ] || python3 -m venv $VENV
  $PY -m pip install -q --upgrade pip
  # A CPU build of torch first where no CUDA is wanted: the plain name pulls several GB of CUDA wheels.
  if ! $PY -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null; then $PY -m pip install -q "torch>=2.6"
    else $PY -m pip install -q torch==2.13.0 || $PY -m pip install -q "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  $PY -m pip install -q -e ".[test]"
  rm -f $VENV/.installed-*
  touch "$stamp"
}

case "${1:-}" in
  run)
    system_packages; python_env
    model=$($VENV/bin/lora-lab models pull-demo)
    if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && [ -z "${QT_QPA_PLATFORM:-}" ]; then
      echo "no display: starting the window on a virtual X server (Xvfb)"
      exec xvfb-run -a -s "-screen 0 1400x900x24" $VENV/bin/python -m app --model "$model" "${@:2}"
    fi
    exec $VENV/bin/python -m app --model "$model" "${@:2}" ;;
  test)
    system_packages; python_env
    export QT_QPA_PLATFORM=offscreen
    exec $PY -m pytest "${@:2}" ;;
  *) echo "usage: bash dev.sh run|test [args]"; exit 2 ;;
esac
