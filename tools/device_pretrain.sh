#!/usr/bin/env bash
# Retrain the bundled tiny-shapes base on a lent GPU, as one script for a short lease without network.
#
#   OUT=... bash tools/device_pretrain.sh
#
# Why: on 2 CPU cores the shipped base's VAE got 1,500 steps (73 min) and its UNet 2,000 (102 min).
# Its VAE is what caps the demo's circle IoU: the true fill50k images through it score 0.717,
# and 0.27 on circles of radius 3-5 px, which the standard world never showed it. This trains
# the `wide` world (half the images with fill50k's geometry) for many more steps.
#
# Stage 1 trains the VAE only (`--unet_steps 0`) and copies it to $OUT/vae; stage 2 reuses it and
# trains the UNet + text encoder, exporting the EMA model every 1,000 steps (copied to $OUT/model
# as each export lands), so a stage stopped at its time limit still returns what it finished.
# Each stage checkpoints every 250 steps (in $W, which stays while the machine is warm): a stage stopped at its
# limit continues when this script is run again on the same machine.
# Env: LATENT_DOWNSAMPLE (4; 2 for 32x32 latents), LATENT_CHANNELS (8), VAE_STEPS (6000), VAE_BATCH (64), UNET_STEPS (6000), UNET_BATCH (64), N_IMAGES (50000),
# VAE_LIMIT / UNET_LIMIT (seconds per stage: 240 / 300), DEVICE (cuda). Inputs: .whl/ as for
# tools/device_bench.sh. CPU rehearsal: DEVICE=cpu NO_WHEELS=1 PYTHON=.venv/bin/python VAE_STEPS=2
# UNET_STEPS=2 N_IMAGES=64 OUT=/tmp/reh-pre bash tools/device_pretrain.sh
set -u
OUT=${OUT:-device-out}
W=${PRETRAIN_WORK:-/tmp/difftune-pretrain}
mkdir -p "$OUT" "$W"
source tools/device_env.sh
DEVICE=${DEVICE:-cuda}
COMMON=(--out "$W" --world wide --latent_downsample "${LATENT_DOWNSAMPLE:-4}" --latent_channels "${LATENT_CHANNELS:-8}" --n_images "${N_IMAGES:-50000}" --vae_steps "${VAE_STEPS:-6000}"
        --vae_batch "${VAE_BATCH:-64}" --unet_batch "${UNET_BATCH:-64}" --device "$DEVICE" --seed 0)
echo "[device_pretrain] flags: ${COMMON[*]} --unet_steps ${UNET_STEPS:-6000}"
( while sleep 10; do cp "$W/pretrain_log.jsonl" "$OUT/" 2>/dev/null
    [ -f "$W/model/model_index.json" ] && rm -rf "$OUT/model" && cp -r "$W/model" "$OUT/model"; done ) &
COPIER=$!
start=$SECONDS
timeout "${VAE_LIMIT:-240}" $PY -m difftune pretrain-base "${COMMON[@]}" --unet_steps 0 || echo "[device_pretrain] VAE stage failed or timed out"
echo "[device_pretrain] VAE stage: $((SECONDS - start)) s"
if [ -f "$W/vae/config.json" ]; then
  cp -r "$W/vae" "$OUT/vae"
  start=$SECONDS
  timeout "${UNET_LIMIT:-300}" $PY -m difftune pretrain-base "${COMMON[@]}" --unet_steps "${UNET_STEPS:-6000}" \
    || echo "[device_pretrain] UNet stage failed or timed out"
  echo "[device_pretrain] UNet stage: $((SECONDS - start)) s"
fi
kill $COPIER 2>/dev/null
cp "$W/pretrain_log.jsonl" "$OUT/" 2>/dev/null
[ -f "$W/model/model_index.json" ] && rm -rf "$OUT/model" && cp -r "$W/model" "$OUT/model"
ls -R "$OUT" | head -40
