#!/usr/bin/env bash
# test_format.sh: every C, CUDA and header file of the repository is formatted as .clang-format says
# (`make format` rewrites them). SKIPs where clang-format is not installed. Ends with "N passed, N failed".
set -u
cd "$(dirname "$0")/.." || exit 2
command -v clang-format >/dev/null || { echo "1..0 # SKIP clang-format is not installed"; exit 0; }
pass=0 fail=0
for f in $(git ls-files -- '*.c' '*.h' '*.cu' '*.cpp'); do
    if clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then pass=$((pass + 1))
    else echo "not ok - $f is not formatted (make format)"; fail=$((fail + 1)); fi
done
echo "ok - $pass files formatted as .clang-format says"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
