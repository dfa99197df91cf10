#!/usr/bin/env bash
# One call on a GPU host: first a correctness check of the blockwise losses on the device, then
# the train-step benchmark (all workloads, with --profile), and last iai_256 with --remat.
# Run from the repository root of a checkout on the GPU host:
#
#   bash benchmarks/gpu_session.sh [--anchor PATH] [--wheels DIR]
#
#   --anchor PATH  a plain Flax step to compare against: a Python file whose
#                  run(bs, img, dtype, iters) returns {"samples_per_s": ...}; timed on the IaI
#                  workloads (benchmarks/train_step.py --anchor).
#   --wheels DIR   wheels to install first, for what the host's Python lacks (ml_collections:
#                  mosaic_jax.training.configuration imports it); installed under /tmp/site.
#
# Results go to $OUT (or benchmarks/results when $OUT is unset): gpu.txt, losses_check.txt,
# train_step_gpu.json and train_step_gpu_remat.json with their logs.
set -u
usage="usage: gpu_session.sh [--anchor PATH] [--wheels DIR]"
ANCHOR=""
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --anchor) ANCHOR=${2:?$usage}; shift 2 ;;
    --wheels) WHEELS=${2:?$usage}; shift 2 ;;
    *) echo "gpu_session.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
if [ -n "$ANCHOR" ] && [ ! -f "$ANCHOR" ]; then
  echo "gpu_session.sh: --anchor $ANCHOR is not a file" >&2; exit 2
fi
if [ -n "$WHEELS" ] && ! compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "gpu_session.sh: --wheels $WHEELS holds no .whl file" >&2; exit 2
fi
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" | tee -a "$OUT_DIR/gpu.txt"
# Correctness first (seconds): the losses' blockwise and plain paths agree on this device.
python3 - <<'PY' 2>&1 | tee "$OUT_DIR/losses_check.txt"
import jax, jax.numpy as jnp, numpy as np
from mosaic_jax import losses
k1, k2 = jax.random.split(jax.random.key(0))
a, b = jax.random.normal(k1, (512, 128)), jax.random.normal(k2, (512, 128))
f = lambda x, bs: losses.nt_xent(x, b, temperature=0.1, block_size=bs)
(v0, g0), (v1, g1) = (jax.value_and_grad(f)(a, bs) for bs in (None, 128))
np.testing.assert_allclose(v1, v0, rtol=1e-5)
np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-7)
print("blockwise nt_xent equals plain on", jax.devices()[0].device_kind, float(v0))
PY
# Then throughput: all three workloads (bf16, the default on accelerators), the comparison step
# on the IaI ones when given. --profile: the top ops of each workload come back in the JSON
# (traces under $OUT_DIR/profile).
timeout 400 python3 -m benchmarks.train_step ${ANCHOR:+--anchor "$ANCHOR"} --steps 10 \
  --profile "$OUT_DIR/profile" --output "$OUT_DIR/train_step_gpu.json" 2>&1 \
  | tee "$OUT_DIR/train_step_gpu.log"
# What rematerialisation costs (or saves, where memory binds) at 256 px.
timeout 150 python3 -m benchmarks.train_step --workloads iai_256 --remat --steps 10 \
  --output "$OUT_DIR/train_step_gpu_remat.json" 2>&1 | tee "$OUT_DIR/train_step_gpu_remat.log"
