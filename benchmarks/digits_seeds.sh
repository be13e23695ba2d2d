#!/usr/bin/env bash
# The digits DiffiT and the U-Net baseline, trained for several seeds at once by examples/train_diffit.py with the
# shipped recipe (examples/digits.args), then compared over the seeds by quality_digits.py. Each training is its own
# single-threaded process: eight share one H100 in a few minutes; on a CPU run as many seeds as there are cores / 2.
#
#     bash benchmarks/digits_seeds.sh OUTPUT_DIR SEED [SEED ...] [-- TRAIN_FLAGS ...]
#     DIFFIT_FLAGS="--config_overrides window_size=8" bash benchmarks/digits_seeds.sh outputs/w8 2 3 4 5
#
# TRAIN_FLAGS (train_diffit.py flags, after "--") go to both architectures; DIFFIT_FLAGS to the DiffiT trainings
# only. A finished training in OUTPUT_DIR is reused, so keep one OUTPUT_DIR per recipe. QUALITY_FLAGS adds
# quality_digits.py flags (e.g. --device cuda). Logs: OUTPUT_DIR/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
    sed -n 2,12p "$0"
    exit 2
fi
out=$1; shift
seeds=()
while [[ $# -gt 0 && $1 != "--" ]]; do seeds+=("$1"); shift; done
[[ $# -gt 0 ]] && shift  # the "--"; what is left goes to both architectures
py=${PYTHON:-python3}
mkdir -p "$out"
[[ -d $out/data ]] || $py examples/prepare_digits.py "$out/data"

pids=() diffit=() unet=()
train() {  # NAME FLAGS...: one training into OUTPUT_DIR/NAME unless it finished before
    local name=$1; shift
    [[ -f $out/$name/model_index.json ]] && return
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} $py examples/train_diffit.py @examples/digits.args \
        --train_data_dir "$out/data" --output_dir "$out/$name" "$@" >"$out/$name.log" 2>&1 & pids+=($!)
}
for seed in "${seeds[@]}"; do
    diffit+=("$out/diffit_s$seed") unet+=("$out/unet_s$seed")
    train "diffit_s$seed" --seed "$seed" "$@" ${DIFFIT_FLAGS:-}
    train "unet_s$seed" --architecture unet --seed "$seed" "$@"
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "a training failed; see $out/*.log" >&2; exit 1; }
done

$py -m benchmarks.quality_digits ${QUALITY_FLAGS:-} --diffit "${diffit[@]}" --unet "${unet[@]}"
