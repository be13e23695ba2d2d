#!/usr/bin/env bash
# The digits DiffiT and the U-Net baseline, trained for several seeds at once with the same recipe, then compared
# over the seeds by quality_digits.py. Made for one GPU: each training is its own process, and eight share an H100
# in about 4 minutes (train_digits.py --device cuda).
#
#     bash benchmarks/digits_seeds.sh OUTPUT_DIR SEED [SEED ...] [-- RECIPE_FLAGS ...]
#     DIFFIT_FLAGS="--window_size 8" bash benchmarks/digits_seeds.sh outputs/seeds 2 3 4 5 -- --learning_rate 5e-4
#
# RECIPE_FLAGS (train_digits.py flags) go to both architectures; DIFFIT_FLAGS (its "DiffiT architecture" flags) to
# the DiffiT trainings only. A U-Net already in OUTPUT_DIR is reused, so keep one OUTPUT_DIR per recipe. DEVICE
# (default cuda) is where both scripts run; QUALITY_FLAGS adds quality_digits.py flags. Logs: OUTPUT_DIR/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
    sed -n 2,11p "$0"
    exit 2
fi
out=$1; shift
seeds=()
while [[ $# -gt 0 && $1 != "--" ]]; do seeds+=("$1"); shift; done
[[ $# -gt 0 ]] && shift  # the "--"; what is left is the recipe, for both architectures
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out"

pids=() diffit=() unet=()
for seed in "${seeds[@]}"; do
    diffit+=("$out/diffit_s$seed/pipeline") unet+=("$out/unet_s$seed/ema")
    $py examples/train_digits.py --output_dir "$out/diffit_s$seed" --seed "$seed" --device "$device" "$@" \
        ${DIFFIT_FLAGS:-} >"$out/diffit_s$seed.log" 2>&1 & pids+=($!)
    if [[ ! -d $out/unet_s$seed/ema ]]; then
        $py examples/train_digits.py --output_dir "$out/unet_s$seed" --architecture unet --seed "$seed" \
            --device "$device" "$@" >"$out/unet_s$seed.log" 2>&1 & pids+=($!)
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "a training failed; see $out/*.log" >&2; exit 1; }
done

$py benchmarks/quality_digits.py --device "$device" ${QUALITY_FLAGS:-} --diffit "${diffit[@]}" --unet "${unet[@]}"
