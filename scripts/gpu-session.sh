#!/usr/bin/env bash
# Issue 15's GPU checks, in as few device calls as a lent session allows.
#
#   scripts/gpu-session.sh prepare   here, no GPU needed: the wheels the lent
#                                    machine lacks (it has torch and
#                                    transformers, no internet) into .whl/, and
#                                    the embedded model's tokenizer into
#                                    .cache/smollm2-tokenizer/ (both git-ignored)
#   scripts/gpu-session.sh run       on the lent machine (the device tool's
#                                    `run`, carrying .whl and
#                                    .cache/smollm2-tokenizer): installs them,
#                                    runs tests/test_gpu.py, then
#                                    benchmarks/bench_gpu.py; logs and JSON into
#                                    $OUT (default: out/)
#
# MODELS (default "135m 1b,8b": one bench call per item, so a slow large
# model cannot cost the small one's table) and CONCURRENCY (default for the
# large models: 1,64) shape the run.
set -euo pipefail
cd "$(dirname "$0")/.."
tokenizer=.cache/smollm2-tokenizer

prepare() {
    local python=${PYTHON:-.venv/bin/python}
    "$python" -m pip download -q --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
        --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl pydantic-settings pydantic "llguidance>=1.9,<2"
    local converted
    converted=$("$python" -c 'from pad_core.model_loading import resolve_model_folder
from pad_core.settings import EMBEDDED_MODEL, EngineSettings
print(resolve_model_folder(EMBEDDED_MODEL, EngineSettings().cache_dir))')
    mkdir -p "$tokenizer"
    cp "$converted"/tokenizer.json "$converted"/tokenizer_config.json "$converted"/chat_template.jinja "$tokenizer"/
    du -sh .whl "$tokenizer"
}

run() {
    local out=${OUT:-out}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PAD_TEST_TOKENIZER_DIR=$tokenizer
    python3 -m pip install -q --no-index --find-links .whl pydantic-settings llguidance
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
        | tee -a "$out/device.txt"
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" || true
    for models in ${MODELS:-135m 1b,8b}; do
        local args=()
        # today's runner at 8b would spend the session's minutes on a known-slow path
        [[ $models != 135m ]] && args=(--concurrency "${CONCURRENCY:-1,64}" --skip-transformers)
        python3 -m benchmarks.bench_gpu --tokenizer "$tokenizer" --models "$models" "${args[@]}" \
            --json "$out/bench_${models//,/_}.json" 2>&1 | tee "$out/bench_${models//,/_}.log" || true
    done
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
