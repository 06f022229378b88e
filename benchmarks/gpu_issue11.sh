#!/usr/bin/env bash
# Issue 11 on the lent GPU machine, one stage per device call, from the repository root:
#
#   bash benchmarks/gpu_issue11.sh tests|kernels|llama|dit
#
# Launch it with the ignored wheel folder carried along (run tool: carry [".whl"]); it holds
# diffusers-0.42.1, importlib_metadata and lazy_importer (importlib_metadata 10.x imports it on
# Python < 3.15; the GPU image has zipp and every other diffusers dependency). Logs and JSON go
# to $OUT. A device call may run 10 minutes; every command here is capped by STAGE_TIMEOUT
# (default 500 s) so a slow stage still returns its log, and bench_e2e rewrites its JSON after
# every row (marked "partial" until the run ends).
#
# Environment (all optional):
#   llama: LAYERS (default: auto, the real 32 on an H200), SEQS ("2048"), BATCHES ("1 4"),
#          CONFIGS ("none hadamard hadamard_kv")
#   dit:   DIT_LAYERS (28), DIT_CONFIGS ("none haar2d_hadamard"), DIT_BATCH (1)
#   both:  KERNEL (unset: the library's default lowering, what users get)
#   tests: PYTEST_ARGS (default "tests/gpu": the whole GPU tier)
#   kernels: LOWERINGS ("default inductor triton"), LENGTHS ("2048 4096 8192"), DIMS ("4096 8192")
#   smoke test on a CPU: PYTHON (python3), DEVICE (cuda), QUICK=1 (adds --quick, drops the
#          kernel grid), e.g. PYTHON=/path/venv/bin/python DEVICE=cpu QUICK=1 bash ... llama
#
# Expected durations (estimates from the H200 runs in RESULTS.md, code 5bca19c: 8 Llama layers
# compiled cold in 18 s with inductor and 41 s with stamp; 28 DiT blocks in 26 s / 175 s):
#   tests   1-3 min
#   kernels 2-4 min (6 shapes x 7 methods, each a small compile and a CUDA-graph timing)
#   llama   per (batch, seq): inductor baseline 1 compile + 1 per config, each about 1-3 min
#           at 32 layers, so one call holds about one batch with all three configs
#           (BATCHES=1 ... then BATCHES=4 ...) or, at S=4096 or when compiles are slow,
#           fewer configs (CONFIGS="none hadamard", then CONFIGS=hadamard_kv)
#   dit     28 blocks: inductor about 0.5 min, each stamp config 1-4 min (haar2d was 6.9x the
#           inductor compile in the issue's measurement); split with DIT_CONFIGS if needed
set -o pipefail
set -eu
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/issue11_out}
mkdir -p "$OUT"
stage=${1:?usage: gpu_issue11.sh tests|kernels|llama|dit}
limit=${STAGE_TIMEOUT:-500}

# diffusers (absent from the GPU image)
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}

# stamp_fx without building it: the package maps stamp_fx.lowering to lowering/ (pyproject), so
# lay that tree out in /tmp and run Python with -P (no implicit current directory on sys.path,
# which would put the repository's stamp_fx/ without lowering/ first); the repository stays on
# PYTHONPATH for benchmarks/ and tests/.
pkg=/tmp/stamp_pkg
rm -rf "$pkg" && mkdir -p "$pkg" && cp -r stamp_fx "$pkg/" && cp -r lowering "$pkg/stamp_fx/lowering"
# The torch_dynamo_backends entry point (backend="stamp") as an installed package declares it.
mkdir -p "$pkg/stamp_fx-0.0.0.dist-info"
printf 'Metadata-Version: 2.1\nName: stamp-fx\nVersion: 0.0.0\n' >"$pkg/stamp_fx-0.0.0.dist-info/METADATA"
printf '[torch_dynamo_backends]\nstamp = stamp_fx.backend:stamp_backend\n' \
    >"$pkg/stamp_fx-0.0.0.dist-info/entry_points.txt"
export PYTHONPATH=$pkg:$PYTHONPATH:$PWD
py() { timeout "$limit" "$PYTHON" -P "$@"; }
py -c "import stamp_fx, stamp_fx.lowering, diffusers, torch, triton; print('stamp_fx', stamp_fx.__file__, '| diffusers', diffusers.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
    | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv >> "$OUT/env.txt" 2>&1 || true

common=(--device "$DEVICE")
if [ -n "${QUICK:-}" ]; then common+=(--quick) && : "${SEQS:=64}" "${BATCHES:=1}"; fi
kernel_args=()
if [ -n "${KERNEL:-}" ]; then kernel_args=(--lowering "$KERNEL"); fi
start=$(date +%s)
case "$stage" in
  tests)
    # shellcheck disable=SC2086  # PYTEST_ARGS: words split on spaces, so name tests by node id
    # (tests/gpu/test_x.py::test_y), not with a -k expression that holds spaces
    py -m pytest -q -p no:cacheprovider --import-mode=append -m gpu ${PYTEST_ARGS:-tests/gpu} 2>&1 \
        | tee "$OUT/tests_gpu.log"
    ;;
  kernels)
    # shellcheck disable=SC2086  # word lists
    grid=(--lengths ${LENGTHS:-2048 4096 8192} --dims ${DIMS:-4096 8192})
    if [ -n "${QUICK:-}" ]; then grid=(); fi
    py -m benchmarks.bench_kernels "${common[@]}" "${grid[@]}" --methods kernel --rotation \
        --lowerings ${LOWERINGS:-default inductor triton} --json "$OUT/kernels_rotation.json" 2>&1 \
        | tee "$OUT/kernels_rotation.log"
    ;;
  llama)
    layers_args=()
    if [ -n "${LAYERS:-}" ]; then layers_args=(--layers "$LAYERS"); fi
    tag="llama_L${LAYERS:-auto}_S${SEQS:-2048}_b${BATCHES:-1 4}_${CONFIGS:-all}"
    tag=${tag// /-}
    # shellcheck disable=SC2086
    py -m benchmarks.bench_e2e "${common[@]}" --workloads llama "${layers_args[@]}" \
        --seqs ${SEQS:-2048} --batches ${BATCHES:-1 4} \
        --configs ${CONFIGS:-none hadamard hadamard_kv} "${kernel_args[@]}" \
        --json "$OUT/e2e_$tag.json" 2>&1 | tee "$OUT/e2e_$tag.log"
    ;;
  dit)
    dit_args=()
    if [ -n "${DIT_LAYERS:-}" ]; then dit_args=(--dit-layers "$DIT_LAYERS"); fi
    tag="dit_L${DIT_LAYERS:-28}_${DIT_CONFIGS:-all}"
    tag=${tag// /-}
    # shellcheck disable=SC2086
    py -m benchmarks.bench_e2e "${common[@]}" --workloads dit "${dit_args[@]}" \
        --dit-batch "${DIT_BATCH:-1}" --dit-configs ${DIT_CONFIGS:-none haar2d_hadamard} \
        "${kernel_args[@]}" --json "$OUT/e2e_$tag.json" 2>&1 | tee "$OUT/e2e_$tag.log"
    ;;
  *)
    echo "unknown stage $stage (tests|kernels|llama|dit)" >&2
    exit 2
    ;;
esac
echo "stage $stage took $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
