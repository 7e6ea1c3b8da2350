#!/bin/bash
# Full benchmark run: MiniLM first (all suites), then SmolLM2 resumed into the same JSON.
cd /work/main
OUT=benchmarks/results/full-run.json
if [ -f "$OUT" ]; then RES="--resume $OUT"; else RES="--out $OUT"; fi
.venv/bin/python -m benchmarks --suite all --models minilm-l6 --repeats 5 $RES
.venv/bin/python -m benchmarks --suite all --models smollm2-135m --repeats 3 --resume $OUT
