#!/bin/sh
# The demo bootstrap (installed as `wmpo-bootstrap` in the trainer image; compose's `bootstrap` service and the
# Kubernetes `bootstrap` Job run it). It makes what a WMPO run starts from, on the shared volumes:
#   a small dataset from the simulator (expert + noisy episodes, so the reward model sees failures too),
#   a tiny VLA trained by imitation on images only (imagination has no proprio), published as policy
#   version 1 (aliases latest and stable), and a world model and a reward model, published to the registry
#   (Triton serves the registry's latest of each).
# Each step runs only when its marker under $DATA/.bootstrap is absent, so a restart resumes where it stopped
# and a second `docker compose up` does nothing. Sizes are for a CPU: override them with BOOTSTRAP_* variables.
set -eu

DATA="${BOOTSTRAP_DATA:-/data}"
REGISTRY="${BOOTSTRAP_REGISTRY:-/registry}"
TASK="${BOOTSTRAP_TASK:-reach}"
EPISODES="${BOOTSTRAP_EPISODES:-30}"
NOISY_EPISODES="${BOOTSTRAP_NOISY_EPISODES:-20}"
IMAGE_SIZE="${BOOTSTRAP_IMAGE_SIZE:-32}"
BC_STEPS="${BOOTSTRAP_BC_STEPS:-400}"
WM_STEPS="${BOOTSTRAP_WM_STEPS:-600}"
REWARD_STEPS="${BOOTSTRAP_REWARD_STEPS:-300}"
DEVICE="${BOOTSTRAP_DEVICE:-cpu}"
REDIS="${WMPO_TRAINER_REDIS_URL:-redis://redis:6379/0}"

DATASET="$DATA/datasets/$TASK"
CKPT="$DATA/checkpoints"
MARKS="$DATA/.bootstrap"
mkdir -p "$MARKS" "$CKPT" "$DATA/runs"

# step NAME COMMAND...: run COMMAND unless NAME is marked done, then mark it.
step() {
  name="$1"
  shift
  if [ -e "$MARKS/$name.done" ]; then
    echo "bootstrap: $name: done already"
    return 0
  fi
  echo "bootstrap: $name"
  "$@"
  touch "$MARKS/$name.done"
}

# Collection appends to a dataset, so an interrupted collection starts again from an empty folder.
collect() {
  rm -rf "$DATASET"
  wmpo data collect --task "$TASK" --episodes "$EPISODES" --out "$DATASET" --image-size "$IMAGE_SIZE" --seed 0
  wmpo data collect --task "$TASK" --episodes "$NOISY_EPISODES" --out "$DATASET" --image-size "$IMAGE_SIZE" \
    --noise 1.0 --seed 10000
}

step collect collect
step train-bc wmpo policy train-bc --data "$DATASET" --out "$CKPT/policy" --steps "$BC_STEPS" --no-proprio \
  --device "$DEVICE"
step publish-policy wmpo policy publish "$CKPT/policy" --registry "$REGISTRY" --redis "$REDIS" --note bootstrap
step promote-policy wmpo policy promote latest --registry "$REGISTRY" --alias stable --redis "$REDIS"
step train-worldmodel wmpo worldmodel train --data "$DATASET" --out "$CKPT/worldmodel" --steps "$WM_STEPS" \
  --device "$DEVICE"
step publish-worldmodel wmpo worldmodel publish "$CKPT/worldmodel" --registry "$REGISTRY"
step train-reward wmpo reward train --data "$DATASET" --out "$CKPT/reward" --steps "$REWARD_STEPS" --device "$DEVICE"
step publish-reward wmpo reward publish "$CKPT/reward" --registry "$REGISTRY"
echo "bootstrap: ready (dataset $DATASET, registry $REGISTRY)"
