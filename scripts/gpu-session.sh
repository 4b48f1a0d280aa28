#!/usr/bin/env bash
# Issue 15's GPU checks, in as few device calls as a lent session allows.
#
#   scripts/gpu-session.sh prepare   here, no GPU needed: the wheels the lent
#                                    machine lacks (it has torch and
#                                    transformers, no internet) into .whl/, and
#                                    the embedded model's tokenizer into
#                                    .cache/smollm2-tokenizer/ (both git-ignored)
#   scripts/gpu-session.sh run [STAGE...]
#                                    on the lent machine (the device tool's
#                                    `run`, carrying .whl and
#                                    .cache/smollm2-tokenizer): installs them,
#                                    then the stages (default: all, in this
#                                    order); logs and JSON into $OUT (default out/)
#
# One call runs every stage (a session's device time is 15 minutes, the
# machine's start included, and one command may run 10): each stage has a
# time limit of its own (SIGINT: bench_gpu rewrites its JSON after every
# row, and a runner that fails is logged and skipped, so a stage cut short
# or broken keeps what it measured), and they add up to ~8 minutes, which
# leaves a lent session the 4 minutes a second, shorter call needs. The
# device tool's timeout_s should be 495.
#   bench135m  benchmarks/bench_gpu.py on 135m, concurrency 1,16,64: cuda,
#              the anchor, transformers, slots                         <= 230 s
#   tests      tests/test_gpu.py (graphs recorded and replayed, float32 tokens
#              equal to the transformers runner, one sync per step)    <= 80 s
#   large      bench_gpu on 8b then 1b, concurrency 1,64: cuda runner and
#              the anchor                                              <= 120 s
#   host       benchmarks/step_host_cost.py on 135m, 64 PAD requests    <= 35 s
#   bars135m   (not in the default run) bench_gpu on 135m: the cuda runner at
#              1,16,64, the others at 64 only: the bars' rows in one
#              shorter run, for a second call                        <= 190 s
# `run STAGE...` runs only those (a second call, if time is left).
set -euo pipefail
cd "$(dirname "$0")/.."
tokenizer=.cache/smollm2-tokenizer

prepare() {
    local python=${PYTHON:-.venv/bin/python}
    "$python" -m pip download -q --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
        --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl pydantic-settings pydantic "llguidance>=1.9,<2" msgpack
    # peft (LoRA reward adapters and their test) without its dependencies,
    # which transformers already brings, but for accelerate's psutil.
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
        --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl peft accelerate psutil
    local converted
    converted=$("$python" -c 'from pad_core.model_loading import resolve_model_folder
from pad_core.settings import EMBEDDED_MODEL, EngineSettings
print(resolve_model_folder(EMBEDDED_MODEL, EngineSettings().cache_dir))')
    mkdir -p "$tokenizer"
    cp "$converted"/tokenizer.json "$converted"/tokenizer_config.json "$converted"/chat_template.jinja "$tokenizer"/
    # transformers 5 writes its own class name; 4.x (the lent machine may have it) knows the fast tokenizer's
    "$python" - "$tokenizer/tokenizer_config.json" <<'PY'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["tokenizer_class"] = "PreTrainedTokenizerFast"
json.dump(config, open(path, "w"), indent=2)
PY
    du -sh .whl "$tokenizer"
}

run() {
    local out=${OUT:-out}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PAD_TEST_TOKENIZER_DIR=$tokenizer
    python3 -m pip install -q --no-index --find-links .whl pydantic-settings llguidance msgpack
    python3 -m pip install -q --no-index --find-links .whl --no-deps peft accelerate psutil
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
        | tee -a "$out/device.txt"
    local stages=("$@")
    [[ ${#stages[@]} -eq 0 ]] && stages=(bench135m tests large host)
    for stage in "${stages[@]}"; do
        case $stage in
            tests)
                limited 80 python3 -m pytest -q -p no:cacheprovider -p no:randomly tests/test_gpu.py 2>&1 \
                    | tee "$out/test_gpu.log" || true ;;
            bench135m)
                limited 230 python3 -m benchmarks.bench_gpu --tokenizer "$tokenizer" --models 135m \
                    --json "$out/bench_135m.json" 2>&1 | tee "$out/bench_135m.log" || true ;;
            bars135m)
                limited 190 python3 -m benchmarks.bench_gpu --tokenizer "$tokenizer" --models 135m \
                    --others-concurrency 64 --json "$out/bench_135m.json" 2>&1 | tee "$out/bench_135m.log" || true ;;
            large)
                # today's runner and the graph-less pool at 8b would spend the session's minutes on known-slow paths
                limited 120 python3 -m benchmarks.bench_gpu --tokenizer "$tokenizer" --models 8b,1b --concurrency 1,64 \
                    --skip-transformers --skip-slots --json "$out/bench_8b_1b.json" 2>&1 \
                    | tee "$out/bench_8b_1b.log" || true ;;
            host)
                limited 35 python3 -m benchmarks.step_host_cost --device cuda --model 135m --backend cuda --requests 64 \
                    --steps 100 --rounds 2 --tokenizer "$tokenizer" 2>&1 | tee "$out/host_cost.log" || true ;;
            *) echo "unknown stage $stage" >&2; exit 2 ;;
        esac
    done
}

# A stage's time limit: SIGINT first (Python unwinds, files are written), KILL 10 s later.
limited() {
    local seconds=$1
    shift
    timeout --signal=INT --kill-after=10 "$seconds" "$@"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
