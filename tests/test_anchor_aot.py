"""benchmarks/anchor_aot.py: the side-by-side compile of our step and a plain Flax step."""

from __future__ import annotations

import importlib.util
import math
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import anchor_aot

# A stand-in for the anchor file with its interface (IaI(dtype)(s1, s2, train) -> four
# projections; nt_xent(a, b)), tiny: one BatchNorm'd Dense per tower.
TINY_ANCHOR = textwrap.dedent('''
    import jax, jax.numpy as jnp, flax.linen as nn

    class Tower(nn.Module):
        dtype: object
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(8, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
            return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)

    class IaI(nn.Module):
        dtype: object
        @nn.compact
        def __call__(self, s1, s2, train=True):
            h1 = Tower(self.dtype, name="enc_s1")(s1, train)
            h2 = Tower(self.dtype, name="enc_s2")(s2, train)
            return [nn.Dense(4, name=n)(h) for n, h in
                    [("inter_s1", h1), ("inter_s2", h2), ("intra_s1", h1), ("intra_s2", h2)]]

    def nt_xent(a, b, tau=0.5):
        z = jnp.concatenate([a, b]); z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
        n = a.shape[0]; s = z @ z.T / tau
        s = jnp.where(jnp.eye(2 * n, dtype=bool), -1e9, s)
        pos = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(s, 1), pos[:, None], 1))
''')


@pytest.fixture
def tiny_anchor(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_anchor.py"
    path.write_text(TINY_ANCHOR)
    return path


def test_load_anchor_names_the_file_and_what_it_lacks(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("IaI = object\n")
    with pytest.raises(ValueError, match=r"bad\.py: defines no nt_xent"):
        anchor_aot.load_anchor(bad)
    with pytest.raises(ValueError, match="no such file"):
        anchor_aot.load_anchor(tmp_path / "missing.py")


def test_anchor_step_is_three_passes_three_nt_xent_terms_and_adam(tiny_anchor: Path):
    module = anchor_aot.load_anchor(tiny_anchor)
    model, tx, step = anchor_aot.anchor_step(module, jnp.float32)
    rng = np.random.default_rng(0)
    xs = tuple(jnp.asarray(rng.normal(size=(4, 6, 6, c)), jnp.float32)
               for c in (2, 2, 2, 10, 10, 10))
    v = model.init(jax.random.PRNGKey(0), xs[0], xs[3])
    state = (v["params"], v["batch_stats"], tx.init(v["params"]))

    # Reference, written out: pass k on views (k, 3 + k); inter on pass 0, intra on passes 1, 2.
    def reference_loss(params):
        stats, outs = v["batch_stats"], []
        for k in range(3):
            o, upd = model.apply({"params": params, "batch_stats": stats}, xs[k], xs[3 + k],
                                 mutable=["batch_stats"])
            stats, outs = upd["batch_stats"], [*outs, o]
        return (module.nt_xent(outs[0][0], outs[0][1]) + module.nt_xent(outs[1][2], outs[2][2])
                + module.nt_xent(outs[1][3], outs[2][3])), stats

    (want, want_stats), grads = jax.value_and_grad(reference_loss, has_aux=True)(v["params"])
    updates, _ = optax.adam(1e-4).update(grads, tx.init(v["params"]), v["params"])
    want_params = optax.apply_updates(v["params"], updates)
    (params, stats, _), loss = jax.jit(step)(state, xs)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 stats, want_stats)

    # Adam's first step is about lr * sign(g): compare where the gradient is well above float
    # error (the biases of the Dense before BatchNorm get a zero gradient up to round-off).
    def same_update(p, w, g):
        clear = np.abs(np.asarray(g)) > 1e-4
        np.testing.assert_allclose(np.asarray(p)[clear], np.asarray(w)[clear], rtol=1e-5)

    jax.tree.map(same_update, params, want_params, grads)
    assert sum(int((np.abs(g) > 1e-6).sum()) for g in jax.tree.leaves(grads)) > 10


HLO = textwrap.dedent('''
    HloModule m

    %fused_computation (p0: f32[16,128], p1: f32[128,128]) -> f32[16,128] {
      %p0 = f32[16,128]{1,0} parameter(0)
      %p1 = f32[128,128]{1,0} parameter(1)
      ROOT %convolution.7 = f32[16,128]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf
    }

    ENTRY %main.1 (a: f32[16,128], w: f32[128,128]) -> bf16[16,128] {
      %a = f32[16,128]{1,0} parameter(0)
      %w = f32[128,128]{1,0} parameter(1)
      %b = f32[16,128]{1,0} bitcast(%a)
      %fusion = f32[16,128]{1,0} fusion(%b, %w), kind=kOutput, calls=%fused_computation, %s
      ROOT %convert = bf16[16,128]{1,0} convert(%fusion), metadata={op_name="jit(f)/convert"}
    }
''')


HLO = HLO.replace("%s", 'metadata={op_name="jit(f)/dot_general"}')


def test_hlo_top_counts_output_and_operands_outside_fusion_bodies():
    top = anchor_aot.hlo_top(HLO)
    assert [(r["name"], r["op"]) for r in top] == [("fusion", "fusion"), ("convert", "convert")]
    assert top[0]["bytes"] == 16 * 128 * 4 * 2 + 128 * 128 * 4  # output, a (via bitcast), w
    assert top[0]["op_name"] == "jit(f)/dot_general"
    assert top[1]["bytes"] == 16 * 128 * 2 + 16 * 128 * 4
    assert anchor_aot.op_totals(HLO) == {"fusion": top[0]["bytes"], "convert": top[1]["bytes"]}


def test_tiled_bytes_pads_the_two_minor_dimensions_to_the_tile():
    # NHWC with 2 channels minor: 2 -> 128 lanes, W = 120 -> 120 (a multiple of 8).
    assert anchor_aot.tiled_bytes("f32[64,120,120,2]{3,2,1,0:T(8,128)}") == 64 * 120 * 120 * 128 * 4
    # Layout order decides which dimensions are minor: here H (dim 1) is the lane dimension.
    assert anchor_aot.tiled_bytes("bf16[4,5,3]{1,2,0:T(8,128)}") == 4 * 128 * 8 * 2
    assert anchor_aot.tiled_bytes("(f32[16,128]{1,0}, s32[])") == 16 * 128 * 4 + 4


def test_roofline_is_the_larger_of_compute_and_hbm_time():
    peak, bandwidth = anchor_aot.PEAK["TPU v5 lite"]
    assert (peak, bandwidth) == (197e12, 819e9)
    assert anchor_aot.roofline_s(197e12, 819e9 / 2, "TPU v5 lite") == pytest.approx(1.0)
    assert anchor_aot.roofline_s(197e12 / 2, 819e9, "TPU v5 lite") == pytest.approx(1.0)
    assert anchor_aot.roofline_s(1.0, 1.0, "TPU v9") is None


def test_ratios_and_markdown_pair_each_of_our_rows_with_the_anchor_of_its_slice():
    def row(side, flops, nbytes, temps, roof, overrides=None):
        return {**anchor_aot.row_key(side, "v5e:2x2", 120, 64, overrides or {}),
                "flops_per_chip": flops, "bytes_accessed_per_chip": nbytes,
                "flops_per_sample": flops / 64, "bytes_accessed_per_sample": nbytes / 64,
                "memory_bytes": {"temporaries": temps}, "roofline_step_s": roof,
                "bound": "HBM"}

    anchor, ours = row("anchor", 2.0, 4.0, 10, 0.5), row("ours", 2.0, 5.0, 7, 0.6)
    q = anchor_aot.ratios(ours, anchor)
    assert q == pytest.approx({"FLOPs": 1.0, "bytes accessed": 1.25, "temporaries": 0.7,
                               "roofline time": 1.2})
    ablation = row("ours", 1.0, 4.0, 7, 0.5, {"model.sync_bn": "false"})
    table = anchor_aot.markdown({"rows": [anchor, ours, ablation]}).splitlines()
    assert len(table) == 4
    assert "1.00x, 1.25x, 0.70x, 1.20x" in table[2]
    assert "model.sync_bn=false" in table[3] and "0.50x, 1.00x, 0.70x, 1.00x" in table[3]
    assert not math.isnan(q["FLOPs"])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_anchor_compiles_for_v5e_2x2_with_the_batch_sharded(tiny_anchor: Path):
    from mosaic_jax.training import aot

    aot.compile_only_environment()
    devices = aot.topology_devices("v5e:2x2")
    module = anchor_aot.load_anchor(tiny_anchor)
    compiled = anchor_aot.lower_anchor(module, devices, 16, 8).compile()
    summary = anchor_aot.program_summary(compiled, devices[0].device_kind, 4)
    assert summary["flops_per_chip"] > 0 and summary["bytes_accessed_per_chip"] > 0
    # Sharded batch, replicated state: the gradients (and BatchNorm sums) are all-reduced.
    assert any(c["kind"] == "all-reduce" for c in summary["collectives"])
    assert summary["roofline_step_s"] == anchor_aot.roofline_s(
        summary["flops_per_chip"], summary["bytes_accessed_per_chip"], "TPU v5 lite")
