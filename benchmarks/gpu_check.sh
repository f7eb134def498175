#!/usr/bin/env bash
# One-shot correctness + speed check of the Triton kernels on a lent H100/H200.
#
# Installs nothing itself: uses the machine's python3 (torch + triton preinstalled) and makes
# `geomerase` importable through a symlink farm in a temp dir (same mapping as setup.py).
# Stages, each under `timeout`, each allowed to fail without stopping the next:
#   1. environment   - GPU, driver, versions
#   2. tests         - pytest on tests/kernels + the dispatch tests, compiled kernels (no
#                      interpreter), gpu-marked tests included; autotuning off (one config per
#                      shape class) and pytest-xdist when present, to keep compiles short
#   3. bench-attn    - bench_attention over the SD-1.5 shape table (Triton configs compiled
#                      in parallel first), partial results kept if the stage times out
#   3b. profile-attn - profile_attention: per shape, triton vs cuDNN/flash SDPA, host time
#                      (enqueue), eager (CUDA events) and device-only (CUDA graph replay) µs,
#                      Triton launches per call and the tile configs it tuned (its own
#                      tuning: ~1-2 s per shape; the compiled binaries come from stage 3)
#   4. bench-emb     - bench_loc_embedding at CLIP size
#   4b. train-*      - SD-1.5-shaped UNet 512 px, bf16, img/s and MFU: plain loop and ZeRO-2 (one
#                      rank) with attention through sdpa, then through Triton
#   5. summary       - compact tables, printed last
# Budget: stage limits add up to 475 s (about 9 minutes with start-up and transfers). Everything goes
# to ${OUT:-benchmarks/results}: attention.{json,csv,md}, attention_profile.{json,csv,md},
# loc_embedding_gpu.{json,csv,md}, train_throughput_gpu_*.json and gpu_check.log (12 files: more
# than a lent machine sends back, so point OUT elsewhere and pack them into one archive).
# The device image has torch and triton but not diffusers or deepspeed (nor their pydantic,
# hjson): carry those as wheels and put them on PYTHONPATH first, e.g.
#   bash benchmarks/gpu_wheels.sh   (here, once: fills .whl/), then there:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site \
#     OUT=/tmp/g bash benchmarks/gpu_check.sh; tar czf "$OUT/gpu_check.tgz" -C /tmp g
# Without a GPU it still runs (tests in the interpreter, tiny benchmarks): a dry run of the script.
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
# The repository root holds a `geomerase/` folder with only the top-level modules; with the
# working directory first on sys.path it would shadow the full package mapped in $FARM.
export PYTHONSAFEPATH=1
T0=$(date +%s)
STAGES=()

# ---- import path: $FARM/geomerase/{__init__.py,...,core,kernels,...} -> repository folders
FARM="$(mktemp -d)"
trap 'rm -rf "$FARM"' EXIT
mkdir -p "$FARM/geomerase"
for f in "$REPO"/geomerase/*; do
  [ -e "$f" ] && ln -s "$f" "$FARM/geomerase/$(basename "$f")"
done
[ -e "$FARM/geomerase/__init__.py" ] || : > "$FARM/geomerase/__init__.py"
for sub in core kernels distributed data benchmarks configs; do
  [ -d "$REPO/$sub" ] && ln -sfn "$REPO/$sub" "$FARM/geomerase/$sub"
done
export PYTHONPATH="$FARM${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 1

run_stage() {  # run_stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== [$name] limit ${limit}s: $*" | tee -a "$LOG"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 25
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t ))
  [ "$rc" = 124 ] && echo "!!! [$name] timed out after ${limit}s" | tee -a "$LOG"
  STAGES+=("$name rc=$rc ${dt}s")
  echo "=== [$name] rc=$rc in ${dt}s" | tee -a "$LOG"
}

# ---- 1. environment
run_stage env 20 bash -c "
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || echo 'nvidia-smi: none'
  $PY - <<'EOF'
import importlib, torch
print('python3 torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))
for m in ('triton', 'pytest', 'xdist', 'diffusers', 'xformers'):
    try:
        print(m, getattr(importlib.import_module(m), '__version__', 'present'))
    except Exception as e:
        print(m, 'MISSING', type(e).__name__)
import geomerase.kernels, geomerase.core.attention as a
print('geomerase from', geomerase.kernels.__file__, '| backends', a.available_backends())
EOF"

HAS_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
XDIST=()
if [ "$HAS_GPU" = 1 ] && $PY -c "import xdist" 2>/dev/null; then XDIST=(-n 12); fi  # compiles are CPU-bound

# ---- 2. correctness on the GPU (compiled kernels)
run_stage tests 130 env GEOMERASE_FLASH_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -rfEs "${XDIST[@]}" \
  tests/kernels/test_attention.py tests/kernels/test_loc_embedding.py tests/core/test_attention_dispatch.py

# ---- 3./4. benchmarks (bench_attention rewrites its files after every shape)
if [ "$HAS_GPU" = 1 ]; then
  # (first H200 run: 76 s for the whole table; the budget stops new shapes, files stay)
  run_stage bench-attn 110 "$PY" -m geomerase.benchmarks.bench_attention --out "$OUT" \
    --precompile-workers 8 --precompile-timeout 60 --budget-s 90
  # reuses bench-attn's compiled kernels (tunes again: the on-disk autotune cache is not used,
  # one knob less that could break the main numbers); small shapes first, budget-capped
  run_stage profile-attn 40 "$PY" -m geomerase.benchmarks.profile_attention --out "$OUT" --budget-s 25
  run_stage bench-emb 20 "$PY" -m geomerase.benchmarks.bench_loc_embedding --out "$OUT"
else
  run_stage bench-attn 120 "$PY" -m geomerase.benchmarks.bench_attention --tiny --out "$OUT"
  # no GPU: Triton launches mocked, the wrapper's host cost per SD shape (two shapes, batch 1)
  run_stage profile-attn 90 "$PY" -m geomerase.benchmarks.profile_attention --out "$OUT" \
    --batch 1 --shapes self-64-hd160,cross-1024x77-hd80
  run_stage bench-emb 120 "$PY" -m geomerase.benchmarks.bench_loc_embedding --tiny --out "$OUT"
fi

# ---- 4b. training throughput: SD-1.5-shaped UNet, 512 px, bf16: plain loop + ZeRO-2 (one rank) with
#      attention through sdpa, then through the Triton kernel, then the plain loop under torch.compile
#      (DeepSpeed may be absent from the machine's python: then only the plain loop is reported)
if [ "$HAS_GPU" = 1 ]; then
  TPUT=(--size sd15 --batch 16 --steps 8 --warmup 3 --precision bf16 --out "$OUT")
  run_stage train-sdpa 65 "$PY" -m geomerase.benchmarks.train_throughput "${TPUT[@]}" --attention sdpa --stage 2
  # (2026-11-29 H200: 53 s, Triton tuning each UNet shape; --compile needs > 150 s, so it is left out)
  run_stage train-triton 90 "$PY" -m geomerase.benchmarks.train_throughput "${TPUT[@]}" --attention triton --stage 2
else
  run_stage train-sdpa 120 "$PY" -m geomerase.benchmarks.train_throughput --size debug --batch 4 --steps 3 \
    --warmup 1 --precision fp32 --stage 2 --out "$OUT"
fi

# ---- 5. summary, last
{
  echo
  echo "================ summary ($(( $(date +%s) - T0 ))s total) ================"
  for s in "${STAGES[@]}"; do echo "stage $s"; done
  grep -E "^[0-9]+ (passed|failed)|^(FAILED|ERROR) |[0-9]+ (passed|failed|error)" "$LOG" | tail -n 12
  OUT="$OUT" timeout 20 "$PY" - <<'EOF'
import json, math, os, pathlib
out = pathlib.Path(os.environ["OUT"])
def f(v):
    return "NaN" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3g}" if isinstance(v, float) else str(v))
for stem in ("attention", "attention_tiny"):
    p = out / f"{stem}.json"
    if not p.exists():
        continue
    d = json.loads(p.read_text())
    env = d["environment"]
    print(f"\n{stem}: {env.get('gpu') or env.get('cpu')} torch {env.get('torch')} triton {env.get('triton')}  "
          f"{len(d['errors'])} NaN-recorded failure(s)")
    print(f"{'shape':>20} {'backend':>14} {'fwd TF/s':>9} {'bwd TF/s':>9} {'err':>8}")
    for r in d["rows"]:
        print(f"{r['shape']:>20} {r['backend']:>14} {f(r.get('fwd_tflops')):>9} {f(r.get('bwd_tflops')):>9} "
              f"{f(r.get('rel_err_vs_sdpa')):>8}")
    by = {}
    for r in d["rows"]:
        by.setdefault(r["shape"], {})[r["backend"]] = r
    print(f"\n{'shape':>20} {'fwd x':>6} {'bwd x':>6} {'both x':>6} {'target':>6}  (triton speed / best SDPA)")
    for shape, rs in by.items():
        tri = rs.get("triton", {})
        line = [f"{shape:>20}"]
        for k in ("fwd", "bwd", "both"):
            best = min([r[f"{k}_ms"] for n, r in rs.items() if n.startswith("sdpa-") and r.get(f"{k}_ms") == r.get(f"{k}_ms")] or [float("nan")])
            t = tri.get(f"{k}_ms", float("nan"))
            line.append(f"{f(best / t if t == t and t else float('nan')):>6}")
        line.append(f"{1.15 if (tri.get('Sk') == 77 or tri.get('D') in (40, 80, 160)) else 1.0:>6}")
        print(" ".join(line))
for stem in ("attention_profile", "attention_profile_cpu"):
    p = out / f"{stem}.json"
    if not p.exists():
        continue
    d = json.loads(p.read_text())
    print(f"\n{stem}: µs per call; host = enqueue, eager = CUDA events, graph = device only (CUDA graph); "
          f"xH = eager/graph; {len(d['errors'])} failure(s)")
    print(f"{'shape':>20} {'backend':>11} {'fwd host':>8} {'eager':>7} {'graph':>7} {'xH':>5} "
          f"{'bwd host':>8} {'eager':>7} {'graph':>7} {'xH':>5} {'launch':>6}  triton config")
    for r in d["rows"]:
        g = lambda c: f(r.get(c))
        print(f"{r['shape']:>20} {r['backend']:>11} {g('fwd_host_us'):>8} {g('fwd_eager_us'):>7} {g('fwd_graph_us'):>7} "
              f"{g('fwd_host_bound'):>5} {g('bwd_host_us'):>8} {g('bwd_eager_us'):>7} {g('bwd_graph_us'):>7} "
              f"{g('bwd_host_bound'):>5} {str(r.get('fwd_launches', '-')) + '+' + str(r.get('bwd_launches', '-')):>6}  "
              f"{r.get('triton_config', '')}")
    for e in d["errors"][:8]:
        print("  !", e[:160])
rows = [json.loads(p.read_text()) for p in sorted(out.glob("train_throughput_*.json"))]
if rows:
    print(f"\ntraining step: {'attention':>9} {'compile':>7} {'plain img/s':>11} {'MFU':>6} {'ZeRO img/s':>10} {'MFU':>6}  TFLOP/img")
    for r in rows:
        print(f"{'':>14} {r.get('attention', 'sdpa'):>9} {str(r.get('compile', False)):>7} {f(r['plain_images_per_s']):>11} "
              f"{f(r['plain_mfu']):>6} {f(r['zero_images_per_s']):>10} {f(r['zero_mfu']):>6}  {r['flops_per_image'] / 1e12:.3g}")
for stem in ("loc_embedding_gpu", "loc_embedding_tiny_gpu", "loc_embedding_tiny_cpu"):
    p = out / f"{stem}.json"
    if p.exists():
        d = json.loads(p.read_text())
        print(f"\n{stem}: variant bwd_ms peak_MiB grad_MiB")
        for r in d["rows"]:
            print(f"  {r['variant']:>11} {f(r.get('bwd_ms')):>8} {f(r.get('bwd_peak_mib')):>8} {f(r.get('grad_mib')):>8}")
EOF
} 2>&1 | tee -a "$LOG"
