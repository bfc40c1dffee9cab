#!/bin/bash
# Custom Diffusion quality on a tiny base: MODEL (default tiny-shapes), STEPS, N, LR (default 2e-3), WORK (output folder), PY (python with difftune),
# EXTRA (more flags for every training run, e.g. "--freeze_model crossattn"),
# RUNS (default: all of star-noprior star-prior heart-prior joint merged star-prior-r2; merged needs star-prior and heart-prior, star-prior-r2 needs star-prior)
set -e
mkdir -p "${WORK:-/tmp/cdmeasure}"; cd "${WORK:-/tmp/cdmeasure}"
M=${MODEL:-tiny-shapes}
PY=${PY:-python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
$PY - <<'PY'
from pathlib import Path
from difftune.data.shapes import ShapeSample, render_shape
import numpy as np
rng = np.random.default_rng(0)
for shape, col, bg, name in (("star", (255, 215, 0), (25, 25, 112), "star"), ("heart", (220, 20, 60), (240, 255, 240), "heart")):
    d = Path(f"inst-{name}"); d.mkdir(exist_ok=True)
    for i in range(6):
        size = rng.uniform(12, 20); cx, cy = rng.uniform(size, 64 - size, 2)
        render_shape(ShapeSample(shape, cx, cy, size, "c", col, "b", bg), 64).save(d / f"{i}.png")
PY
cat > concepts.json <<J
[{"instance_prompt": "<new1> star", "class_prompt": "star", "instance_data_dir": "${WORK:-/tmp/cdmeasure}/inst-star", "class_data_dir": "${WORK:-/tmp/cdmeasure}/cls-star"},
 {"instance_prompt": "<new2> heart", "class_prompt": "heart", "instance_data_dir": "${WORK:-/tmp/cdmeasure}/inst-heart", "class_data_dir": "${WORK:-/tmp/cdmeasure}/cls-heart"}]
J
COMMON="--pretrained_model_name_or_path $M --resolution 64 --train_batch_size 4 --learning_rate ${LR:-2e-3} --max_train_steps ${STEPS:-150} --seed 0 --num_class_images 24 --sample_batch_size 8 --checkpointing_steps 100000 ${EXTRA:-}"
T="$PY -m difftune.cli"
RUNS=${RUNS:-star-noprior star-prior heart-prior joint merged star-prior-r2}
want() { [[ " $RUNS " == *" $1 "* ]]; }
want star-noprior && $T train custom-diffusion $COMMON --instance_data_dir inst-star --instance_prompt "<new1> star" --output_dir star-noprior
want star-prior && $T train custom-diffusion $COMMON --instance_data_dir inst-star --instance_prompt "<new1> star" --class_prompt star --class_data_dir cls-star --with_prior_preservation --output_dir star-prior
want heart-prior && $T train custom-diffusion $COMMON --instance_data_dir inst-heart --instance_prompt "<new1> heart" --class_prompt heart --class_data_dir cls-heart --with_prior_preservation --output_dir heart-prior
want joint && $T train custom-diffusion $COMMON --concepts_list concepts.json --modifier_token "<new1>+<new2>" --with_prior_preservation --output_dir joint --max_train_steps $(( ${STEPS:-150} * 2 ))
want merged && $T custom-diffusion merge --pretrained_model_name_or_path $M --concepts star-prior heart-prior --output_dir merged
want star-prior-r2 && $T custom-diffusion compress --pretrained_model_name_or_path $M --custom_diffusion star-prior --rank 2 --output_dir star-prior-r2
for r in $RUNS; do
  [ "$r" = heart-prior ] && continue
  $T eval custom-diffusion --pretrained_model_name_or_path $M --custom_diffusion $r --n ${N:-16} --num_inference_steps 20 --out eval-$r > eval-$r.txt 2>/dev/null
  echo "== $r"; cat eval-$r.txt
done
