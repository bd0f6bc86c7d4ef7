#!/usr/bin/env bash
# One-command GPU check: the `-m gpu` tests and the SD1.5 throughput benchmark, in a fixed time budget.
#
#   bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS]   # on a CUDA machine (default budget 465 s)
#   bash scripts/gpu_check.sh --dry-run [--out DIR]             # the same code on the CPU, tiny models (170 s)
#
# Phases, each with a deadline (what would overrun is skipped and recorded as skipped):
#   1. setup: installs the wheels in .whl/ (if any; pip --target, no network) unless the same
#      versions are already importable, and the project itself (`pip install --no-deps
#      --no-build-isolation --no-index -e .`) unless its entry points are already registered: the
#      registries find the built-in methods through them, so PYTHONPATH alone is not enough;
#   2. env: GPU, driver, Python and package versions;
#   3. pytest: `pytest -m gpu tests/test_gpu.py` (the benchmark script on the tiny models on CUDA,
#      our sampler ≡ diffusers' pipeline at η = 0, deadlines that interrupt GPU work);
#   4. benchmark: scripts/bench_sd_throughput.py at SD1.5 size (random weights, nothing downloaded),
#      bf16, 512², 50 DDIM steps, η = 1, CFG 5:
#      - the measured bf16 matmul peak (8192³ product, mean of 10 after 3 warm-ups);
#      - sampling images/s of our sampler against diffusers' StableDiffusionPipeline built from the
#        SAME modules, batch 1/4/8/16, interleaved in one process after a warm-up;
#      - the sampler's achieved FLOP/s (images/s × FLOP per image, flop_counter) as a share of the
#        measured peak and of the data-sheet peak;
#      - seconds per update and peak memory of every registered method, batch 1/4/8 (all methods
#        at batch 1 first, then 4, then 8), each guarded: an error, out-of-memory or timeout is a row.
#   --dry-run runs the same phases on the CPU: tiny test models, 3 steps, batch 1/2, 1 thread.
#
# Output (flat, 6 files, in --out; default results/benchmarks/gpu-<date>[-dryrun]/):
#   SUMMARY.md                     read this first: phase table (status, seconds), test result, and the
#                                  benchmark's tables (copied from the .md below)
#   sd15_throughput_<device>.json  every number (settings, FLOPs, matmul peak, sampling rows of both
#                                  samplers, per-method rows with phases, phase times, provenance)
#   sd15_throughput_<device>.md    the benchmark's tables
#   pytest_gpu.log                 the test output;  env.txt  versions and nvidia-smi;  gpu_check.log  everything
# How to read it: in the sampling table, `ratio` > 1 means our sampler is faster than diffusers at that
# batch (ours keeps latents on the CPU, as training does, so small batches pay a transfer per step);
# "% measured peak" is what share of this GPU's achievable bf16 matmul rate the sampler reaches
# (SD sampling mixes convolutions, attention and memory-bound ops: far below 100 % is expected).
# A method row holding an error or "skipped" is a finding, not a failure of the check: online methods
# (seiko-*, sqdf-online) need their task's oracle features, which the benchmark does not build.
# Exit status: 0 if every phase ran (test failures and per-row errors are reported, not fatal), 1 otherwise.

set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

DRY=0 OUT="" BUDGET=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --out=*) OUT=${1#--out=} ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --budget=*) BUDGET=${1#--budget=} ;;
        -h | --help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'; accepted: --dry-run, --out DIR, --budget SECONDS" >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET" in '' | *[!0-9]*) [ -z "$BUDGET" ] || { echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2; } ;; esac
DATE=$(date -u +%Y-%m-%d)
if [ "$DRY" = 1 ]; then
    BUDGET=${BUDGET:-170} OUT=${OUT:-results/benchmarks/gpu-$DATE-dryrun} SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_dryrun_site}
else
    BUDGET=${BUDGET:-465} OUT=${OUT:-results/benchmarks/gpu-$DATE} SITE=${GPU_CHECK_SITE:-/tmp/site}
fi
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
if [ -z "${PYTHON:-}" ]; then  # the machine's python3 if it has torch (the GPU image), else the project's venv
    if python3 -c 'import torch' 2>/dev/null; then PYTHON=python3; elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
START=$SECONDS
RESERVE=10  # seconds kept for the summary
PHASES=()

left() { echo $((BUDGET - (SECONDS - START) - RESERVE)); }

# run_phase NAME CAP LOG CMD...: CMD under `timeout` (at most CAP s, at most what the budget has left),
# its output also appended to LOG (or not, if LOG is -); skipped when under 10 s are left.
run_phase() {
    local name=$1 cap=$2 log=$3 t0 rc lim st
    shift 3
    lim=$(left)
    [ "$cap" -lt "$lim" ] && lim=$cap
    if [ "$lim" -lt 10 ]; then
        echo "== $name: skipped ($(left) s of the budget left)"
        PHASES+=("$name|skipped: $(left) s of the budget left|0")
        return 0
    fi
    echo "== $name (deadline ${lim} s; $(left) s of the budget left)"
    t0=$SECONDS
    if [ "$log" = - ]; then timeout -k 10 "$lim" "$@"; rc=$?; else timeout -k 10 "$lim" "$@" 2>&1 | tee -a "$log"; rc=${PIPESTATUS[0]}; fi
    if [ "$rc" = 0 ]; then st=ok; elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then st="stopped at its ${lim} s deadline"; else st="exit $rc"; fi
    PHASES+=("$name|$st|$((SECONDS - t0))")
    return 0
}

install_wheels() {
    local whl=()
    shopt -s nullglob; whl=(.whl/*.whl); shopt -u nullglob
    if [ ${#whl[@]} = 0 ]; then echo "no wheels in .whl/: using the packages already installed"; return 0; fi
    if "$PYTHON" - "${whl[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
def have(name, ver):
    try:
        return version(name) == ver
    except PackageNotFoundError:
        return False
sys.exit(0 if all(have(*w.rsplit("/", 1)[-1].split("-")[:2]) for w in sys.argv[1:]) else 1)
PY
    then
        echo "the carried wheels' versions are already importable: not reinstalled (${whl[*]})"
        return 0
    fi
    echo "installing ${#whl[@]} wheels into $SITE (no network)"
    timeout 240 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}" || return 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

project_registered() {
    "$PYTHON" - <<'PY'
import sys
from importlib.metadata import entry_points
values = {ep.value for ep in entry_points(group="diffusion_alignment_bench.plugins")}
sys.exit(0 if {"bench.tasks", "methods", "rewards", "metrics"} <= values else 1)
PY
}

install_project() {
    if project_registered; then
        echo "the project's entry points are registered: not reinstalled"
    elif timeout 240 "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
        echo "installed the project (editable, no network)"
    else
        echo "editable install failed; installing a copy into $SITE"
        timeout 240 "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . || return 1
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PYTHON" -c 'from bench.core.registry import METHODS; print("registered methods:", ", ".join(METHODS.names()))'
}

write_env() {
    {
        echo "date: $(date -u +%FT%TZ)  mode: $([ "$DRY" = 1 ] && echo dry-run || echo gpu)  budget: $BUDGET s"
        echo "host: $(uname -a)"
        echo "cpus: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
        echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)"
        echo "python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))  PYTHONPATH=${PYTHONPATH:-}"
        "$PYTHON" - <<'PY'
from importlib.metadata import version
for p in ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors", "open_clip_torch", "ftfy", "wcwidth", "submitit", "huggingface_hub", "numpy", "pytest"):
    try:
        print(f"{p}: {version(p)}")
    except Exception as e:
        print(f"{p}: missing ({type(e).__name__})")
import torch
print("cuda:", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
        command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

bench_args() {
    if [ "$DRY" = 1 ]; then
        echo --tiny --device cpu --dtype bf16 --threads 1 --steps 3 --warmup-steps 1 --batch-sizes 1,2 --method-batch-sizes 1,2 \
            --repeats 1 --method-repeats 1 --method-warmup 0 --matmul-n 512 --measure-cap 30
    else
        echo --device cuda --dtype bf16 --steps 50 --warmup-steps 2 --batch-sizes 1,4,8,16 --method-batch-sizes 1,4,8 \
            --repeats 2 --method-repeats 1 --method-warmup 1 --matmul-n 8192 --measure-cap 60
    fi
}

write_summary() {
    local md total=$((SECONDS - START)) p
    md=$(ls "$OUT"/sd15_throughput_*.md 2>/dev/null | head -1)
    {
        echo "# GPU check, $(date -u +%FT%TZ)"
        echo
        echo "Mode: $([ "$DRY" = 1 ] && echo 'DRY RUN on the CPU (tiny models: the numbers say nothing about SD1.5)' || echo GPU)." \
            "$(grep -m1 '^cuda:' "$OUT/env.txt" 2>/dev/null). $(grep -m1 '^git:' "$OUT/env.txt" 2>/dev/null)." \
            "Total ${total} s of a ${BUDGET} s budget. Command: \`bash scripts/gpu_check.sh $([ "$DRY" = 1 ] && echo --dry-run)\`."
        echo
        echo "| phase | status | seconds |"
        echo "|---|---|---|"
        for p in "${PHASES[@]}"; do echo "| ${p//|/ | } |"; done
        echo
        echo "pytest -m gpu: \`$(grep -E '(passed|failed|skipped|error)' "$OUT/pytest_gpu.log" 2>/dev/null | tail -1)\`"
        echo
        if [ -n "$md" ]; then sed 's/^#/##/' "$md"; else echo "(the benchmark wrote no results)"; fi
    } >"$OUT/SUMMARY.md"
}

main() {
    echo "gpu_check: mode $([ "$DRY" = 1 ] && echo dry-run || echo gpu), budget ${BUDGET} s, output $OUT, python $PYTHON"
    local t0=$SECONDS ok=1
    if install_wheels && install_project; then PHASES+=("setup|ok|$((SECONDS - t0))"); else PHASES+=("setup|failed|$((SECONDS - t0))"); ok=0; fi
    t0=$SECONDS; write_env; PHASES+=("env|ok|$((SECONDS - t0))")
    : >"$OUT/pytest_gpu.log"
    run_phase pytest "$([ "$DRY" = 1 ] && echo 60 || echo 150)" "$OUT/pytest_gpu.log" \
        "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
    local lim
    lim=$(left)
    # shellcheck disable=SC2046
    run_phase benchmark "$lim" - "$PYTHON" scripts/bench_sd_throughput.py $(bench_args) --methods all --compare-diffusers \
        --deadline $(($(date +%s) + lim - 15)) --out "$OUT"
    write_summary
    echo "== done in $((SECONDS - START)) s; files in $OUT:"
    ls -la "$OUT"
    for p in "${PHASES[@]}"; do case "$p" in *"|ok|"*) ;; pytest*"|exit 1|"*) ;; *) ok=0 ;; esac; done
    [ "$ok" = 1 ]
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
