#!/usr/bin/env bash
# transformers' own model tests for Llama, Mistral and Qwen2 with every model they build patched by hf_sparse.
#
#   scripts/run_transformers_suite.sh TESTS_DIR [PATTERN ...]
#
# TESTS_DIR is transformers' tests/ folder at a release inside the supported range, e.g. from a clone:
#   git -C transformers archive COMMIT tests | tar -x -C /tmp/tf-tests
# It runs against the transformers that $PYTHON (default: python) imports; the files must match its version.
# PATTERN defaults to the unpatched baseline, "dense" and a window that covers the tests' lengths; "none" is
# the baseline. MODELS (default: "llama mistral qwen2") picks the model files.
# Prints one summary line per (file, pattern); see docs/compat.md for the counts and the expected failures.
set -uo pipefail
tests=$(cd "${1:?usage: $0 TESTS_DIR [PATTERN ...]}" && pwd)
shift
patterns=("$@")
[ ${#patterns[@]} -eq 0 ] && patterns=(none dense "longformer:window=1024,global_tokens=2")
py=${PYTHON:-python}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$tests")
"$py" -m pip install -q parameterized  # transformers' test dependency
# test_pipeline_mixin.py reads transformers' sources from ../src/transformers: the installed package
if [ ! -e "$root/src/transformers" ]; then
    mkdir -p "$root/src"
    ln -s "$("$py" -c 'import os, transformers; print(os.path.dirname(transformers.__file__))')" "$root/src/transformers"
fi
cd "$root"
for name in ${MODELS:-llama mistral qwen2}; do
    for pattern in "${patterns[@]}"; do
        [ "$pattern" = none ] && pattern=""
        summary=$(HF_SPARSE_SUITE_PATTERN="$pattern" PYTHONPATH="$here/transformers_suite${PYTHONPATH:+:$PYTHONPATH}" \
            "$py" -m pytest "tests/models/$name/test_modeling_$name.py" -k "not slow" -q -p no:cacheprovider \
            -p conftest_patch -W ignore -rf 2>&1 | grep -E "^(FAILED|SUBFAILED|ERROR)|passed|failed")
        echo "== $name, pattern: ${pattern:-none (unpatched)}"
        echo "$summary"
    done
done
