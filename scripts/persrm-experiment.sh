#!/usr/bin/env bash
# Issue 6's quality bar, end to end: synthetic pairs -> PersRM adapter ->
# `pad eval` of prompt vs `self` PAD vs the trained PersRM on the whole eval
# set (none of its prompts is used for training; three preference types get
# no training pairs at all, see data/train/build_cases.py).
#
#   scripts/persrm-experiment.sh [WORK_DIR]      (default: results/persrm)
#
# Environment: PAD (the pad command, default `pad`), CASES (synth input,
# default data/train/synth_cases.jsonl), SAMPLES, PAIRS_PER_CASE, EPOCHS,
# EVAL_ARGS (extra `pad eval` flags, e.g. "--limit 1"). PAD_* variables reach
# every engine (e.g. PAD_MAX_RUNNING_REQUESTS on a GPU).
set -euo pipefail
work=${1:-results/persrm}
pad=${PAD:-pad}
cases=${CASES:-data/train/synth_cases.jsonl}
mkdir -p "$work"

echo "== synth pairs from $cases"
$pad data synth "$cases" --out "$work/pairs.jsonl" \
    --samples "${SAMPLES:-16}" --pairs-per-case "${PAIRS_PER_CASE:-4}" --max-tokens 96 --seed 0

echo "== train PersRM"
$pad train "$work/pairs.jsonl" --out "$work/adapter" --epochs "${EPOCHS:-2}" --batch-size 8 \
    --learning-rate 5e-4 --seed 0 ${TRAIN_ARGS:-}

echo "== eval: prompt vs self vs persrm"
# shellcheck disable=SC2086
$pad eval --modes prompt,pad --weights 1,2,4,8 --reward-model self --reward-model persrm \
    --serve-arg=--reward-adapter --serve-arg="persrm=$work/adapter" \
    --max-tokens 96 --out "$work/eval" ${EVAL_ARGS:-}

echo "== the bars: trained types vs prompt, unseen types vs self"
"${PYTHON:-python}" scripts/persrm_report.py "$work/eval/answers.jsonl"
