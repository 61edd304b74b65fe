#!/usr/bin/env bash
# test_docs.sh: the docs name only what exists. Every identifier written in backticks in README.md and
# docs/*.md whose whole span is one name, a call (`name()`, `name(args)`) or a snake_case name
# (`scmoe__moe_gate_encode`, `capacity_factor`), must occur as a word in the code: the library, its headers, the examples, tests,
# benches, tools, build files. Env variables and flags (SCMOE_TRACE, --steps) are not checked here.
# Ends with "N passed, N failed".
set -u
cd "$(dirname "$0")/.." || exit 2
pass=0 fail=0
code_files=$(git ls-files -- '*.c' '*.h' '*.cu' '*.py' '*.sh' '*.mk' '*.in' Makefile 'tools/*' 'examples/*' 'bench/*' \
             'fuzz/*' 'tests/*' '.ci/*' | grep -v '\.md$')
# functions of the C library, MPI and CUDA that docs may name without the code defining them
SYSTEM='usleep|sched_getaffinity|mkstemp|fopen|fsync|rename|malloc|free|exit|abort|_exit|omp_[a-z_]+|openblas_[a-z_]+|dnnl_[a-z_]+|cuda[a-z_]*|cublas[a-z_]*'
# every word of the code, once
words=$(cat $code_files 2>/dev/null | grep -aoE '[A-Za-z_][A-Za-z0-9_]*' | sort -u)
for doc in README.md docs/*.md; do
    [ -f "$doc" ] || continue
    missing=""
    # backtick spans (a span never crosses a line in these docs), then the names in them
    while IFS= read -r name; do
        grep -qxF -- "$name" <<<"$words" || missing="$missing $name"
    done < <(grep -oE '`[^`]+`' "$doc" | tr -d '`' |
             grep -E '^[a-z][a-z0-9]*(_[a-z0-9]+)+(\(.*\))?$|^[a-z][a-z0-9_]*\(.*\)$' |
             sed -E 's/\(.*$//' | grep -vxE "$SYSTEM" | sort -u)
    if [ -z "$missing" ]; then echo "ok - $doc names only what exists"; pass=$((pass + 1))
    else echo "not ok - $doc names what the code does not have:$missing"; fail=$((fail + 1)); fi
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
