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
runs_of() { .venv/bin/python -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))))" "results/$1/runs.json"; }
$B plot $(runs_of alpha-sweep) --kind pareto --out results/alpha-sweep/figures      # Fig. 4: fronts vs the exact front
$B run --suite online --quiet                    # results/online/
$B plot $(runs_of online) --kind queries --out results/online/figures           # gold reward against oracle queries
$B prepare digits
$B run --suite digits --quiet                    # results/digits/ (aesthetic reward)
$B run --suite digits-classifier --quiet         # results/digits-classifier/
