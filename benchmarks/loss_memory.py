"""Peak memory and time of loss + gradient for the blockwise and the plain contrastive losses.

For each of `nt_xent`, `cross_modal_infonce` and `multilabel_supcon`, one fresh subprocess per
case (so that peaks do not mix) builds synthetic embeddings, compiles
`jax.jit(jax.value_and_grad(loss))` with respect to both embedding arrays and runs it, and reports
the process's peak resident memory (`ru_maxrss`: the JAX runtime, the inputs, compilation and
the computation together) and the time of one loss + gradient.

Sizes count views: `--views 65536` is N = 32,768 samples with two views each (for
`cross_modal_infonce`: two modalities), d = 128, 19 classes at label density 0.15. The blockwise
path (`block_size`) runs at `--views` and at `--check-views`; the plain path (the full similarity
matrix) only at `--check-views` and `--plain-views`, where it fits. At `--check-views` the plain
case also computes the blockwise loss on the same inputs and reports the differences of value and
gradient.

Target: loss + gradient for 65,536 views, d = 128, 19 classes under 2 GiB peak (the plain
path's similarity matrix alone is 65,536^2 float32 = 16 GiB).

Usage: python -m benchmarks.loss_memory [--quick] [--output PATH] [--views N] [--block-size B]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import (
    GIB,
    REPO,
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_info,
    peak_rss_bytes,
    write_json,
)
from data_builders import cli

LOSSES = ("nt_xent", "cross_modal_infonce", "multilabel_supcon")
TARGET_VIEWS = 65_536
TARGET_PEAK_GIB = 2.0
# Relative agreement of blockwise and plain values (float32, different summation order).
CHECK_RTOL = 1e-5


def logits_bytes(loss: str, views: int) -> int:
    """Bytes of the float32 similarity matrices the plain path materialises."""
    if loss == "cross_modal_infonce":  # two [N, N] directions, N = views / 2
        return 2 * (views // 2) ** 2 * 4
    return views**2 * 4  # [2N, 2N]


# ----------------------------------------------------------------------------------------------
# One case, in its own process.


def _inputs(loss: str, views: int, dim: int, classes: int, density: float, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = views // 2
    z1 = rng.standard_normal((n, dim), dtype=np.float32)
    z2 = (z1 + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)).astype(np.float32)
    labels = (rng.random((n, classes)) < density).astype(np.float32)
    return z1, z2, labels


def _loss_fn(loss: str, block_size: int | None, labels):
    from mosaic_jax import losses

    if loss == "nt_xent":
        return lambda a, b: losses.nt_xent(a, b, temperature=0.5, block_size=block_size)
    if loss == "cross_modal_infonce":
        return lambda a, b: losses.cross_modal_infonce(a, b, temperature=0.1,
                                                       block_size=block_size)
    if loss == "multilabel_supcon":
        return lambda a, b: losses.multilabel_supcon(a, b, labels, temperature=0.1,
                                                     block_size=block_size)
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Measures one (loss, path, views) case in the current (fresh) process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rss_start = peak_rss_bytes()
    z1_np, z2_np, labels_np = _inputs(spec["loss"], spec["views"], spec["dim"],
                                      spec["classes"], spec["density"], spec["seed"])
    z1, z2, labels = jnp.asarray(z1_np), jnp.asarray(z2_np), jnp.asarray(labels_np)
    del z1_np, z2_np, labels_np
    block = spec["block_size"]
    fn = jax.jit(jax.value_and_grad(_loss_fn(spec["loss"], block, labels), argnums=(0, 1)))

    t0 = time.perf_counter()
    compiled = fn.lower(z1, z2).compile()
    compile_s = time.perf_counter() - t0
    rss_before = peak_rss_bytes()

    times: list[float] = []
    budget_s, total = spec["time_budget_s"], 0.0
    while len(times) < spec["repeats"] and (not times or total < budget_s):
        t0 = time.perf_counter()
        value, grads = compiled(z1, z2)
        jax.block_until_ready((value, grads))
        times.append(time.perf_counter() - t0)
        total += times[-1]
    peak = peak_rss_bytes()
    result: dict[str, Any] = {
        **spec,
        "value": float(value),
        "grad_norm": float(jnp.sqrt(sum(jnp.sum(g * g) for g in grads))),
        "finite": bool(np.isfinite(float(value))
                       and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)),
        "compile_s": compile_s,
        "times_s": times,
        "time_s": sorted(times)[len(times) // 2],
        "peak_rss_gib": peak / GIB,
        "rss_before_run_gib": rss_before / GIB,
        "rss_after_start_gib": rss_start / GIB,
        "plain_logits_gib": logits_bytes(spec["loss"], spec["views"]) / GIB,
    }
    if spec.get("check_block_size"):
        # After the peak is recorded: the blockwise path on the same inputs, for the check.
        other = jax.jit(jax.value_and_grad(
            _loss_fn(spec["loss"], spec["check_block_size"], labels), argnums=(0, 1)))
        value_b, grads_b = other(z1, z2)
        diff = abs(float(value_b) - float(value))
        grad_diff = max(float(jnp.max(jnp.abs(gb - g))) for gb, g in zip(grads_b, grads,
                                                                         strict=True))
        grad_scale = max(float(jnp.max(jnp.abs(g))) for g in grads)
        result["check"] = {
            "block_size": spec["check_block_size"],
            "blockwise_value": float(value_b),
            "plain_value": float(value),
            "abs_diff": diff,
            "rel_diff": diff / max(abs(float(value)), 1e-30),
            "grad_max_abs_diff": grad_diff,
            "grad_max_abs": grad_scale,
            "grad_rel_diff": grad_diff / max(grad_scale, 1e-30),
        }
        result["check"]["ok"] = bool(result["check"]["rel_diff"] < CHECK_RTOL
                                     and result["check"]["grad_rel_diff"] < 1e-3)
    return result


# ----------------------------------------------------------------------------------------------
# The driver.


def case_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (loss, path, views) case the arguments ask for, in run order."""
    common = dict(dim=args.dim, classes=args.classes, density=args.density, seed=args.seed,
                  repeats=args.repeats, time_budget_s=args.time_budget)
    specs = []
    for loss in args.losses:
        for views in sorted({args.check_views, args.views}):
            specs.append(dict(loss=loss, path="blockwise", views=views,
                              block_size=args.block_size, **common))
        for views in sorted({args.check_views, *args.plain_views}):
            spec = dict(loss=loss, path="plain", views=views, block_size=None, **common)
            if views == args.check_views:
                spec["check_block_size"] = args.block_size
            specs.append(spec)
    for s in specs:
        if s["views"] % 2:
            raise SystemExit(f"views must be even (two views per sample), got {s['views']}")
    return specs


def run_in_subprocess(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Runs one case in a fresh Python process; returns its result or an error record."""
    cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--case", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("CASE_RESULT "):
            return {**json.loads(line[len("CASE_RESULT "):]), "subprocess_wall_s": wall}
    tail = (proc.stderr or proc.stdout)[-800:]
    return {**spec, "error": f"exit code {proc.returncode}: {tail}"}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, dict]:
    """The printed table, check lines and target verdict; and the summary for the JSON."""
    headers = ["loss", "path", "views", "block", "plain logits GiB", "peak RSS GiB",
               "RSS before run GiB", "loss+grad s", "compile s", "value",
               f"< {TARGET_PEAK_GIB:g} GiB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["loss"], r["path"], f"{r['views']:,}", r["block_size"] or "-",
                         f"{logits_bytes(r['loss'], r['views']) / GIB:.3f}", "ERROR", "-", "-",
                         "-", r["error"].splitlines()[-1][:60] if r["error"] else "", "-"])
            continue
        under = r["peak_rss_gib"] < TARGET_PEAK_GIB
        rows.append([r["loss"], r["path"], f"{r['views']:,}", r["block_size"] or "-",
                     f"{r['plain_logits_gib']:.3f}", f"{r['peak_rss_gib']:.3f}",
                     f"{r['rss_before_run_gib']:.3f}", f"{r['time_s']:.3f}",
                     f"{r['compile_s']:.2f}", f"{r['value']:.6f}",
                     ("pass" if under else "FAIL") if r["path"] == "blockwise" else "-"])
    lines = [format_table(headers, rows), ""]

    checks = {}
    for r in results:
        if "check" in r:
            c = r["check"]
            checks[r["loss"]] = {"views": r["views"], **c}
            lines.append(
                f"check {r['loss']} at {r['views']:,} views (block {c['block_size']}): "
                f"blockwise {c['blockwise_value']:.7f} vs plain {c['plain_value']:.7f}, "
                f"|diff| {c['abs_diff']:.2e} (rel {c['rel_diff']:.2e}), max |grad diff| "
                f"{c['grad_max_abs_diff']:.2e} (rel {c['grad_rel_diff']:.2e}): "
                f"{'ok' if c['ok'] else 'MISMATCH'}")
        elif r["path"] == "plain" and r["views"] == args.check_views:
            checks[r["loss"]] = {"views": r["views"], "ok": False, "error": r.get("error")}
            lines.append(f"check {r['loss']}: not run ({r.get('error', '')[:80]})")

    at_target = [r for r in results if r["path"] == "blockwise" and r["views"] == TARGET_VIEWS
                 and r["dim"] == 128 and r["classes"] == 19]
    if not at_target:
        verdict = "not measured in this run"
    elif any("error" in r for r in at_target):
        verdict = "FAIL (a case did not complete)"
    else:
        worst = max(r["peak_rss_gib"] for r in at_target)
        verdict = (f"{'PASS' if worst < TARGET_PEAK_GIB else 'FAIL'} (largest peak "
                   f"{worst:.3f} GiB)")
    lines.append(f"target: loss + gradient for {TARGET_VIEWS:,} views, d=128, 19 classes under "
                 f"{TARGET_PEAK_GIB:g} GiB peak: {verdict}")
    summary = {"target": {"views": TARGET_VIEWS, "dim": 128, "classes": 19,
                          "peak_gib": TARGET_PEAK_GIB, "verdict": verdict},
               "checks": checks}
    return "\n".join(lines), summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.new_parser("python -m benchmarks.loss_memory", __doc__)
    p.add_argument("--views", type=int, default=TARGET_VIEWS,
                   help="views of the blockwise run (2 per sample)")
    p.add_argument("--check-views", type=int, default=4096,
                   help="size where plain and blockwise are both run and compared")
    p.add_argument("--plain-views", type=int, nargs="*", default=[8192],
                   help="further sizes for the plain path")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--density", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (at most)")
    p.add_argument("--time-budget", type=float, default=30.0,
                   help="stop repeating a case after this many seconds (one run at least)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for CI: 2,048 views, block 256, plain at 2,048 only")
    p.add_argument("--output", default=str(RESULTS_DIR / "loss_memory.json"))
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.views, args.check_views, args.plain_views = 2048, 2048, []
        args.block_size, args.repeats, args.time_budget = 256, 2, 5.0
        args.timeout = min(args.timeout, 300.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        print("CASE_RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}", flush=True)
    results = []
    for spec in case_specs(args):
        print(f"  running {spec['loss']} {spec['path']} {spec['views']:,} views ...", flush=True)
        results.append(run_in_subprocess(spec, args.timeout))
    table, summary = report(results, args)
    print(table, flush=True)
    path = write_json(args.output, {
        "benchmark": "loss_memory", "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "output")},
        "machine": machine, "cases": results, **summary,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(f"wrote {path}")
    failed = [r for r in results if "error" in r]
    bad_checks = [k for k, c in summary["checks"].items() if not c["ok"]]
    return 1 if failed or bad_checks else 0


if __name__ == "__main__":  # the convention of data_builders.cli: one `error:` line
    sys.exit(cli.run(main))
