#!/usr/bin/env bash
# Regenerates every committed table and figure under results/ (CPU only, no downloads).
# Wall times measured on a 2-core machine, 2 runs in parallel: see results/*/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/bench
$B run --quiet                                   # results/default/        (the embedded default suite)
$B run --suite baselines --quiet                 # results/baselines/
$B run --suite ablations-sqdf --quiet            # results/ablations-sqdf/
$B run --suite alpha-sweep --quiet               # results/alpha-sweep/
$B plot runs/gmm-ring8/sqdf runs/gmm-ring8/draft-kl runs/gmm-ring8/ddpo-kl --kind pareto --out results/alpha-sweep/figures
$B run --suite online --quiet                    # results/online/
$B prepare digits
$B run --suite digits --quiet                    # results/digits/ (aesthetic reward)
$B run --suite digits-classifier --quiet         # results/digits-classifier/
