#!/usr/bin/env bash
# One short GPU slot for the two GPU issues, as one command (device time counts while the machine is held):
#
#   bash ../shared/gpu/prepare.sh                                  # here, once (fills the git-ignored .gpu/)
#   run (carry .gpu):  source .gpu/on-gpu.sh && bash experiments/gpu_slot.sh
#
# 1. the device check (skipped once experiments/results/device_check_h200.json is committed; DEVICE_CHECK=1
#    forces it, 0 skips it), its JSON to $OUT/device_check.json;
# 2. the Table 2 grid (cifar_paper, the must-run variants), continued from the committed pack
#    experiments/results/packs/cifar_paper_gpu/ when there is one, until SLOT_S seconds (default 480) minus a
#    minute for the last checkpoints and the pack have passed;
# 3. the grid's pack ($OUT/pack/) and report ($OUT/report.json) for the next slot.
# Everything printed goes to $OUT/slot.log too. At most 8 files come back. Afterwards, here:
#   cp FILES_AT/device_check.json experiments/results/device_check_h200.json       (first slot only)
#   rm -r experiments/results/packs/cifar_paper_gpu && cp -r FILES_AT/pack experiments/results/packs/cifar_paper_gpu
#   (cd experiments/results/packs/cifar_paper_gpu && for p in *.part00; do cat "${p%.part00}".part* > "${p%.part00}" \
#       && rm "${p%.part00}".part*; done)                                          # files split to come back
#   python -m experiments.compare --grid cifar_paper --root /tmp/cp --unpack experiments/results/packs/cifar_paper_gpu \
#       --report_only --out experiments/results/cifar_paper_gpu
# GRID (default cifar_paper), VARIANTS, PARALLEL (default 4), PACK_IN, PYTHON (default python3), DEVICE_CHECK_S (the
# device check's budget, default 300) and DEVICE_CHECK_ARGS can be set. The whole slot on a CPU (~2 min):
#   OUT=/tmp/o GRID=smoke_grid PARALLEL=2 PYTHON=python DEVICE_CHECK=1 DEVICE_CHECK_ARGS=--quick DEVICE_CHECK_S=60 \
#       SLOT_S=240 bash experiments/gpu_slot.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
PYTHON=${PYTHON:-python3} GRID=${GRID:-cifar_paper} PARALLEL=${PARALLEL:-4} SLOT_S=${SLOT_S:-480}
VARIANTS=${VARIANTS:-$([ "$GRID" = cifar_paper ] && echo child,kd,hkt,reference,hkt_no_ga)}
PACK_IN=${PACK_IN:-experiments/results/packs/${GRID}_gpu}
exec > >(tee -a "$OUT/slot.log") 2>&1
echo "gpu_slot: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') grid $GRID"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

check=${DEVICE_CHECK:-$([ -f experiments/results/device_check_h200.json ] && echo 0 || echo 1)}
if [ "$check" = 1 ]; then
    $PYTHON -m experiments.device_check --json "$OUT/device_check.json" --workdir "$(mktemp -d)" \
        --budget_s "${DEVICE_CHECK_S:-300}" ${DEVICE_CHECK_ARGS:-}
    echo "gpu_slot: device check exit $? after ${SECONDS} s"
fi

minutes=$(( (SLOT_S - SECONDS - 60) / 60 ))
if [ "$minutes" -lt 2 ]; then
    echo "gpu_slot: ${SECONDS} s gone, under 3 minutes left of SLOT_S=$SLOT_S: no grid this slot"
    exit 0
fi
unpack=()
[ -f "$PACK_IN/manifest.json" ] && unpack=(--unpack "$PACK_IN")
$PYTHON -m experiments.compare --grid "$GRID" ${VARIANTS:+--variants "$VARIANTS"} --root "$(mktemp -d)/grid" \
    "${unpack[@]}" --parallel "$PARALLEL" --time_budget "$minutes" --pack "$OUT/pack" --out "$OUT/report"
status=$?
rm -f "$OUT/report.md" "$OUT/report.png"  # rebuilt from the pack with --report_only; keeps the files that come back few
# Files over 16 MiB do not come back (a ResNet-110 parent in training packs ~21 MB): split them in 15 MiB parts.
for f in "$OUT"/pack/*; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 * 2**20)) ]; then
        split -b 15M -d "$f" "$f.part" && rm "$f" && echo "gpu_slot: split $f into $(ls "$f".part* | wc -l) parts"
    fi
done
echo "gpu_slot: grid exit $status after ${SECONDS} s"
exit "$status"
