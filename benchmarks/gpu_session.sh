#!/usr/bin/env bash
# One GPU call for issue #7: the project's train step and the plain Flax measuring stick, same
# machine, same call. Run from the repository root on the GPU machine:
#
#   bash benchmarks/gpu_session.sh device_carry/plain_flax_iai_step.py
#
# device_carry/ (git-ignored, named in the call's `carry`) holds a copy of
# ../shared/anchors/plain_flax_iai_step.py and wheels/ with what the machine's image lacks
# (ml_collections: mosaic_jax.configuration imports it). Results go to $OUT (or
# benchmarks/results when $OUT is unset): train_step_gpu.json and the logs.
set -u
ANCHOR=${1:?usage: gpu_session.sh PATH_TO_plain_flax_iai_step.py}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
if compgen -G "device_carry/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site device_carry/wheels/*.whl || exit 1
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
# Then throughput: all three workloads, the anchor on the IaI ones, bf16 (the default there).
# --profile: the top ops of each workload come back in the JSON (traces under $OUT_DIR/profile).
timeout 400 python3 benchmarks/train_step.py --anchor "$ANCHOR" --steps 10 \
  --profile "$OUT_DIR/profile" --output "$OUT_DIR/train_step_gpu.json" 2>&1 \
  | tee "$OUT_DIR/train_step_gpu.log"
# What rematerialisation costs (or saves, where memory binds) at 256 px.
timeout 150 python3 benchmarks/train_step.py --workloads iai_256 --remat --steps 10 \
  --output "$OUT_DIR/train_step_gpu_remat.json" 2>&1 | tee "$OUT_DIR/train_step_gpu_remat.log"
