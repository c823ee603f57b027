#!/usr/bin/env bash
# Commit the finished cells of the release grids, then regenerate the release (tables, figures, README
# section) from exactly the committed records and commit it: safe while cells are still running, because the
# release is built from a snapshot of HEAD, not from the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for g in cpu equal-evals-cpu; do
  if [ -d "results/runs/$g" ]; then git add "results/runs/$g"; fi
done
if ! git diff --cached --quiet -- results/runs; then
  n=$(git diff --cached --name-only -- results/runs | grep -c record.json || true)
  git commit -q -m "results: ${n} finished release cell(s)" -- results/runs
fi
snap=$(mktemp -d)
trap 'rm -rf "$snap"' EXIT
git archive HEAD results/runs | tar -x -C "$snap"
$PY -m harness.release --results "$snap/results/runs" --out results --readme README.md
git add results/tables results/figures README.md
if ! git diff --cached --quiet -- results/tables results/figures README.md; then
  git commit -q -m "results: release regenerated from the committed records (make tables)" -- \
    results/tables results/figures README.md
fi
git log --oneline -3
