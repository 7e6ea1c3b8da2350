#!/bin/bash
# Full benchmark run: MiniLM-L6 first (all suites), then SmolLM2-135M resumed into the same JSON.
# Usage: bash benchmarks/full_run.sh [OUT.json]   (re-running with the same OUT resumes it)
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results/full-run.json}
if [ -f "$OUT" ]; then RES="--resume $OUT"; else RES="--out $OUT"; fi
$PY -m benchmarks --suite all --models minilm-l6 --repeats 7 $RES
$PY -m benchmarks --suite all --models smollm2-135m --repeats 3 --resume "$OUT"
