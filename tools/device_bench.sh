#!/usr/bin/env bash
# The GPU measurements behind the README's Performance tables, as one script for a short lease
# on a GPU machine without network.
#
#   bash tools/device_bench.sh PART...      PART: sd15 | cd | sd15fast | sdxl | profile (in the order given)
#
# sd15:     ControlNet on the SD 1.5 architecture at 512 px, difftune's configurations and diffusers'
#           train_controlnet.py (bf16, its fastest) side by side, both timed by the shared steptimer;
# cd:       Custom Diffusion, 250 steps at 512 px, batch 2 + 2 class images, on sd15's model;
# sd15fast: `fast_compile_full` (torch.compile of the whole UNet and ControlNet; SD15FAST_CONFIGS=fast_compile for
#           the blocks) on sd15's model and data (apart: it compiles);
# sdxl:     ControlNet on the SDXL architecture at 1024 px (with diffusers' train_controlnet_sdxl.py beside it when
#           .ref/ has it: SDXL_REF_CONFIGS, default fast; run with the embedding cast ANCHORS.md used);
# profile:  `--profile_steps 3` of PROFILE_CONFIGS (default fast,lowmem_fp8) on sd15's model and data (after
#           sd15): where a step's time goes (device busy share, kernels per step, costliest operators), as
#           $OUT/profile-NAME.md (sd15 + sdxl + profile of two configurations: the 8 files a device call returns).
#
# Inputs beside the repository (git-ignored, carried to the GPU machine):
#   .whl/*.whl          wheels the machine lacks (diffusers, datasets, ...), installed to /tmp/site;
#   .whl/bnb_site/      bitsandbytes unpacked (its CUDA 13 library only), for --use_8bit_adam;
#   .ref/steptimer/     ../shared/bench/steptimer;  .ref/train_controlnet.py (and .ref/train_controlnet_sdxl.py)
#                       the diffusers scripts.
# A CPU rehearsal of the script's logic: DEVICE=cpu SD15_ARCH=tiny SDXL_ARCH=tiny-sdxl
# BENCH_EXTRA='--steps 3 --warmup 1 --resolution 64' (later flags override earlier ones).
# PROFILE_FLAGS="--profile_steps 1 --profile_start 1" for the profile part of such a rehearsal.
# NO_WHEELS=1 PYTHON=.venv/bin/python.
# A shorter lease: SD15_CONFIGS / SDXL_CONFIGS (comma-separated bench configs), SD15_SAMPLES / SDXL_SAMPLES,
# REF_CONFIGS (which of SD15_CONFIGS diffusers' script also runs; default bf16).
# Results: $OUT/PART.json (bench.json; `difftune bench` prints its table into PART.log), copied every 10 s while a part
# runs, so a run stopped at its time limit still returns what it measured; $OUT/PART.log.
set -u
OUT=${OUT:-device-out}
W=${BENCH_WORK:-/tmp/difftune-bench}
mkdir -p "$OUT" "$W"
source tools/device_env.sh
DEVICE=${DEVICE:-cuda} SD15_ARCH=${SD15_ARCH:-sd15} SDXL_ARCH=${SDXL_ARCH:-sdxl}
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"
$PY -c "import torch, diffusers, transformers, datasets; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv

REF=()
[ -f .ref/train_controlnet.py ] && [ -d .ref/steptimer ] \
  && REF=(--steptimer .ref/steptimer --reference_script .ref/train_controlnet.py --reference_configs "${REF_CONFIGS:-bf16}")

run_part() {  # NAME, then difftune bench flags
  local name=$1; shift
  local dir=$W/$name
  ( while sleep 10; do cp "$dir/bench.json" "$OUT/$name.json" 2>/dev/null; done ) &
  local copier=$!
  local start=$SECONDS
  $PY -m difftune bench --device "$DEVICE" --out "$dir" "$@" "${EXTRA[@]}" 2>&1 | tee "$OUT/$name.log"
  kill $copier 2>/dev/null
  cp "$dir/bench.json" "$OUT/$name.json" 2>/dev/null
  echo "[device_bench] $name took $((SECONDS - start)) s"
}

REFXL=()
[ -f .ref/train_controlnet_sdxl.py ] && [ -d .ref/steptimer ] \
  && REFXL=(--steptimer .ref/steptimer --reference_script .ref/train_controlnet_sdxl.py --reference_configs "${SDXL_REF_CONFIGS:-fast}")

M15=(--model "$W/sd15/model-$SD15_ARCH")
for part in "$@"; do
  case $part in
    sd15) run_part sd15 --arch "$SD15_ARCH" --configs "${SD15_CONFIGS:-bf16,fast,fast_eager,lowmem_fp8}" "${REF[@]}" \
            --steps 30 --warmup 10 --n_samples "${SD15_SAMPLES:-500}" --timeout 150 ;;
    sd15fast) run_part sd15fast --arch "$SD15_ARCH" "${M15[@]}" --data "$(ls -d "$W"/sd15/fill50k-* | head -1)" --configs "${SD15FAST_CONFIGS:-fast_compile_full}" \
            --steps 30 --warmup 10 --timeout 270 ;;
    cd)   run_part cd --method custom-diffusion --arch "$SD15_ARCH" "${M15[@]}" --configs fast \
            --steps 250 --warmup 10 --timeout 150 ;;
    sdxl) run_part sdxl --arch "$SDXL_ARCH" --configs "${SDXL_CONFIGS:-fast,lowmem_fp8}" "${REFXL[@]}" --steps 20 --warmup 5 \
            --n_samples "${SDXL_SAMPLES:-100}" --timeout 200 ;;
    profile) PROF=${PROFILE_FLAGS:-"--profile_steps 3 --profile_start 8"}
            ADD=() NAMES=()
            IFS=, read -r -a PCONFIGS <<< "${PROFILE_CONFIGS:-fast,lowmem_fp8}"
            for c in "${PCONFIGS[@]}"; do ADD+=(--add_config "${c}_profiled=$c $PROF"); NAMES+=("${c}_profiled"); done
            run_part profile --arch "$SD15_ARCH" "${M15[@]}" --data "$(ls -d "$W"/sd15/fill50k-* | head -1)" \
              "${ADD[@]}" --configs "$(IFS=,; echo "${NAMES[*]}")" --steps 12 --warmup 8 --timeout 150
            for d in "$W"/profile/runs/*/profile; do
              n=$(basename "$(dirname "$d")"); cp "$d/summary.md" "$OUT/profile-$n.md"  # the md only: 8 files come back
              cat "$d/summary.md"
            done ;;
    *) echo "unknown part $part (sd15, sd15fast, cd, sdxl, profile)"; exit 2 ;;
  esac
done
