"""XLA's FLOP count and the parameters of the cross-attention fusion block alone.

`CrossAttentionFusion` (`mosaic_jax/models/fusion.py`) with the defaults of
`configs/mosaic1.py:xattn` (width 512, 8 heads, 2 layers, bf16) on the token grids of two
ResNet-50 towers at 120 px (stem "iai": 8 x 8 tokens of 2048 features each). The forward and
the forward + backward pass (gradients of parameters and tokens) are compiled for the CPU and
XLA's `cost_analysis()` gives their FLOPs; divided by the batch, per sample and view.

Usage: python -m benchmarks.fusion_flops [--output PATH]
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import RESULTS_DIR, describe_machine, format_table, machine_info, write_json
from data_builders import cli


def measure(dim: int = 512, heads: int = 8, layers: int = 2, grid: int = 8,
            features: int = 2048, batch: int = 8) -> dict:
    """Parameters and GFLOP per view of the fusion block (forward, forward + backward)."""
    import jax
    import jax.numpy as jnp

    from mosaic_jax.models.fusion import CrossAttentionFusion

    block = CrossAttentionFusion(dim=dim, num_heads=heads, num_layers=layers,
                                 dtype=jnp.bfloat16)
    tokens = jnp.zeros((batch, grid, grid, features), jnp.bfloat16)
    present = jnp.ones((batch, 2), bool)
    params = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), tokens, tokens, present))

    def forward(p, a, b):
        return block.apply(p, a, b, present)

    def flops(fn) -> float:
        cost = jax.jit(fn).lower(params, tokens, tokens).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"]) / batch / 1e9

    both = jax.grad(lambda p, a, b: jnp.sum(forward(p, a, b).astype(jnp.float32)),
                    argnums=(0, 1, 2))
    return {"dim": dim, "heads": heads, "layers": layers, "tokens_per_modality": grid * grid,
            "token_features": features,
            "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
            "gflop_per_view_forward": flops(forward),
            "gflop_per_view_forward_backward": flops(both)}


def main(argv: list[str] | None = None) -> None:
    parser = cli.new_parser("python -m benchmarks.fusion_flops", __doc__)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "fusion_flops.json")
    args = parser.parse_args(argv)
    info = machine_info(with_jax=True)
    print(f"Machine: {describe_machine(info)}", flush=True)
    r = measure()
    print(format_table(
        ["width", "heads", "layers", "tokens per modality", "token features", "parameters",
         "GFLOP/view fwd", "GFLOP/view fwd+bwd"],
        [[r["dim"], r["heads"], r["layers"], r["tokens_per_modality"], r["token_features"],
          f"{r['parameters'] / 1e6:.1f} M", f"{r['gflop_per_view_forward']:.2f}",
          f"{r['gflop_per_view_forward_backward']:.2f}"]]))
    write_json(args.output, {"machine": info, "fusion_block": r})
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
