#!/usr/bin/env bash
# Test many transformers releases in ONE existing virtual environment, one row of a table per release:
#   scripts/compat_sweep.sh VENV TABLE VERSION[:full] ...
# e.g. scripts/compat_sweep.sh /work/venv-13 compat-table.md 4.57.6:full 5.0.0 5.24.0:full
# Per release only transformers (and the tokenizers and huggingface-hub releases it requires, which pip
# resolves) is swapped, the other packages stay at constraints.txt's versions, as scripts/compat.sh
# does in a fresh environment (that script is the one-line check of a single release; this one is the
# cheap sweep, since building torch's environment once per release costs more than its tests).
# A plain VERSION runs the internals-sensitive subset (SUBSET below: the compatibility layer, prefix
# and prompt tuning with their generate() == greedy-loop tests, generation through deltas) and
# scripts/check_methods.py (every method x every architecture, independent of the tests; ~30 s of
# CPU where the suite's own matrix takes minutes); VERSION:full runs the whole non-integration suite
# and the check. Each row: release, tokenizers, huggingface-hub, what ran, pytest's counts, the
# check's count, seconds. Exits non-zero if any release failed (or collected no test); the venv is
# left at the last release. A failing release's output is kept beside TABLE (TABLE.VERSION.log).
set -uo pipefail
[[ $# -ge 3 ]] || { echo "usage: scripts/compat_sweep.sh VENV TABLE VERSION[:full] ..." >&2; exit 2; }
venv=$1
table=$2
shift 2
cd "$(dirname "$0")/.."
SUBSET=(tests/test_compat.py tests/test_prompt.py tests/test_prefix.py tests/test_prefix_prompt_generation.py
    tests/test_serving.py::test_mixed_generate_matches_each_row_generated_alone
    tests/test_core.py::test_generate_runs_through_the_delta
    tests/test_train.py::test_a_causal_lm_learns_a_generation_task)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v -i -E '^(transformers|tokenizers|huggingface-hub)==' constraints.txt > "$constraints"
[[ -s $table ]] || printf '| transformers | tokenizers | huggingface-hub | ran | pytest | check_methods.py | seconds |\n|---|---|---|---|---|---|---|\n' > "$table"
status=0
for spec in "$@"; do
    version=${spec%%:full}
    if [[ $spec == *:full ]]; then what="whole suite"; tests=(-m "not integration"); else what="subset"; tests=("${SUBSET[@]}"); fi
    if ! "$venv/bin/pip" install -q -c "$constraints" "transformers==$version" > /dev/null 2>&1; then
        echo "| $version | | | $what | install failed | | |" >> "$table"; status=1; continue
    fi
    versions=$("$venv/bin/python" -c 'import tokenizers, huggingface_hub, transformers; print(transformers.__version__, tokenizers.__version__, huggingface_hub.__version__)')
    read -r tf tok hub <<< "$versions"
    [[ $tf == "$version" ]] || { echo "| $version | | | $what | got transformers $tf | | |" >> "$table"; status=1; continue; }
    start=$SECONDS
    log=$(mktemp)
    OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$log" 2>&1
    rc=$?
    OMP_NUM_THREADS=1 "$venv/bin/python" scripts/check_methods.py > "$log.check" 2>&1
    check_rc=$?
    check=$(grep -E '^[0-9]+ of [0-9]+ method' "$log.check" | sed -E 's/ method x model cases passed every check/ cases pass/')
    [[ $check_rc -eq 0 ]] || { status=1; cp "$log.check" "$table.$version.check.log"; }
    counts=$(grep -E '^=*\s*[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | sed -E 's/=//g; s/ in [0-9.]+s.*//; s/^ +//')
    [[ $rc -eq 0 ]] || { status=1; cp "$log" "$table.$version.log"; }
    echo "| $tf | $tok | $hub | $what | ${counts:-pytest exit $rc} | ${check:-exit $check_rc} | $((SECONDS - start)) |" >> "$table"
    rm -f "$log" "$log.check"
done
exit $status
