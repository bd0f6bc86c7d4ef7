#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment in .venv with the pinned package set.
#
#   bash scripts/bootstrap.sh            # create/refresh .venv (no-op when already up to date)
#   bash scripts/bootstrap.sh --freeze   # rewrite constraints.txt from the current .venv
#
# Why pip runs with the find-links source switched off: some machines' pip configuration offers a
# local CPU-only `torch 2.13.0+cpu` wheel, which pip prefers whenever torch==2.13.0 is asked for.
# PyPI's torchvision cannot load next to that wheel (`operator torchvision::nms does not exist`),
# which breaks open_clip, timm, lpips, dreamsim and diffusers' pipelines. We install the standard
# PyPI builds of torch and torchvision as a matching pair instead (they run on CPU and on GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BENCH_VENV:-.venv}
PY=${PYTHON:-python3}

pip_clean() {
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip "$@"
}

if [ "${1:-}" = "--freeze" ]; then
    {
        echo "# Pinned set the README install uses (pip install -c constraints.txt). Regenerate with scripts/bootstrap.sh --freeze."
        echo "# torch/torchvision are the standard PyPI builds; see scripts/bootstrap.sh for why the local CPU wheel is bypassed."
        pip_clean freeze --exclude-editable | grep -v -i '^diffusion-alignment-bench'
    } > constraints.txt
    echo "constraints.txt rewritten"
    exit 0
fi

stamp_of() { cat pyproject.toml constraints.txt | sha256sum | cut -c1-16; }
STAMP="$VENV/.bench-stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of)" ] && "$VENV/bin/python" -c "import bench" 2>/dev/null; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
echo "bootstrap: installing the pinned package set into $VENV (first time: a few minutes, ~5 GB)" >&2
pip_clean install --no-cache-dir -q -c constraints.txt -e ".[sd,dev]"
# Fail loudly here, not later inside a reward model, if torch and torchvision do not match.
"$VENV/bin/python" - <<'PY'
import torch, torchvision
from torchvision.ops import nms
nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5)
print(f"bootstrap: torch {torch.__version__}, torchvision {torchvision.__version__}: OK")
PY
stamp_of > "$STAMP"
