#!/usr/bin/env bash
# Issue 12's PersRM bars, end to end: gated synthetic pairs -> PersRM adapter
# -> `pad eval` of prompt vs `self` PAD vs the trained PersRM at the server
# defaults on the held-out half of the eval set (none of its prompts is used
# for training; three preference types get no training pairs at all, see
# data/train/build_cases.py) -> the bars (scripts/persrm_report.py).
#
#   scripts/persrm-experiment.sh [WORK_DIR]      (default: results/persrm)
#
# Environment: PAD (the pad command, default `pad`), CASES (synth input,
# default data/train/synth_cases.jsonl), SAMPLES, PLAIN_SAMPLES,
# PAIRS_PER_CASE, DEGENERATE_SHARE, LOOP_SHARE, SYNTH_ARGS (e.g. "--limit-questions 16"
# for a CPU run), EPOCHS, TRAIN_ARGS, EVAL_ARGS. The eval runs on all cases;
# the bars are read on the held-out half (eval-heldout/, bars.md).
# PAD_* variables reach every engine (e.g. PAD_MAX_RUNNING_REQUESTS on a GPU).
set -euo pipefail
work=${1:-results/persrm}
pad=${PAD:-pad}
cases=${CASES:-data/train/synth_cases.jsonl}
mkdir -p "$work"

echo "== synth gated pairs from $cases"
# shellcheck disable=SC2086
$pad data synth "$cases" --out "$work/pairs-sampled.jsonl" \
    --samples "${SAMPLES:-4}" --plain-samples "${PLAIN_SAMPLES:-3}" --pairs-per-case "${PAIRS_PER_CASE:-2}" \
    --degenerate-share "${DEGENERATE_SHARE:-0}" --max-tokens 96 --seed 0 ${SYNTH_ARGS:-}

echo "== add pairs whose loser is the winner falling into a loop"
$pad data synth --pairs-in "$work/pairs-sampled.jsonl" --loop-share "${LOOP_SHARE:-0.4}" --seed 0 \
    --out "$work/pairs.jsonl"

echo "== train PersRM"
# shellcheck disable=SC2086
$pad train "$work/pairs.jsonl" --out "$work/adapter" --epochs "${EPOCHS:-2}" --batch-size 8 \
    --learning-rate 5e-4 --seed 0 ${TRAIN_ARGS:-}

echo "== eval at the server defaults: prompt vs self vs persrm"
# shellcheck disable=SC2086
$pad eval --modes base,prompt,pad --weights default --reward-model self --reward-model persrm \
    --serve-arg=--reward-adapter --serve-arg="persrm=$work/adapter" \
    --split all --max-tokens 96 --out "$work/eval" ${EVAL_ARGS:-}

echo "== the bars, on the held-out half"
mkdir -p "$work/eval-heldout"
cp "$work/eval/answers.jsonl" "$work/eval-heldout/"
$pad eval --rescore --split heldout --out "$work/eval-heldout"
"${PYTHON:-python}" scripts/persrm_report.py "$work/eval-heldout/answers.json" --pad pad --persrm "pad[persrm]" \
    | tee "$work/bars.md"
