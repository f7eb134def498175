#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the packages gpu_check.sh needs that the lent GPU machine's image
# lacks: diffusers, deepspeed and their missing dependencies, built or downloaded for CPython 3.12
# on x86-64 (the device's python). Run here, where the package index is reachable; the device
# call then carries .whl and installs it with `pip install --no-index --target`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl "diffusers==$(ver diffusers)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
  hjson annotated-types typing-inspection typing-extensions importlib-metadata qrcode
# DeepSpeed publishes only a source archive; its build without compiled ops is pure Python.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(ver deepspeed)"
ls -l .whl
