"""Time and peak memory of retrieval at BigEarthNet scale: blocked top-k, then the metrics.

Random float32 embeddings (``--queries`` x ``--dim`` queries, ``--archive`` x ``--dim``
archive) and random labels (19 classes, density 0.15) go through
`mosaic_jax.evaluation.retrieval.top_k_similar` (exact top-k, k = ``--k``) and
`mosaic_jax.evaluation.retrieval.per_query_metrics` at k in {10, 100, 1000}. Reported: the
time of each
(top-k including compilation), the process's peak resident memory (``ru_maxrss``) and the
memory the inputs take, against the float32 query x archive matrix the blocked search never
builds.

Target (full sizes): 20,000 queries against 240,000 archive patches, d = 2048, without a
query x archive matrix (19.2 GB) in memory.

Usage: python -m benchmarks.retrieval [--quick] [--queries N] [--archive N] [--dim D]
[--k K] [--output PATH]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.common import (
    GIB,
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_info,
    peak_rss_bytes,
    write_json,
)
from data_builders import cli

NUM_CLASSES = 19
LABEL_DENSITY = 0.15


def _random(rng, rows: int, dim: int, chunk: int = 16384):
    """float32 [rows, dim] standard normal, made in chunks (no float64 copy of it all)."""
    import numpy as np

    out = np.empty((rows, dim), np.float32)
    for lo in range(0, rows, chunk):
        out[lo:lo + chunk] = rng.standard_normal((min(chunk, rows - lo), dim), np.float32)
    return out


def run(queries: int, archive: int, dim: int, k: int, query_block: int,
        archive_block: int) -> dict:
    import numpy as np

    from mosaic_jax.evaluation import retrieval

    rng = np.random.default_rng(0)
    q = _random(rng, queries, dim)
    a = _random(rng, archive, dim)
    yq = rng.random((queries, NUM_CLASSES)) < LABEL_DENSITY
    ya = rng.random((archive, NUM_CLASSES)) < LABEL_DENSITY
    inputs_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    _, ranked = retrieval.top_k_similar(q, a, k, query_block=query_block,
                                        archive_block=archive_block)
    t_topk = time.perf_counter() - t0
    ks = [x for x in (10, 100, 1000) if x <= k]
    t0 = time.perf_counter()
    metrics = retrieval.per_query_metrics(yq, ya, ranked, ks)
    t_metrics = time.perf_counter() - t0
    return {
        "queries": queries, "archive": archive, "dim": dim, "k": k,
        "query_block": query_block, "archive_block": archive_block,
        "topk_seconds": t_topk, "metrics_seconds": t_metrics,
        "similarities_per_second": queries * archive / t_topk,
        "inputs_bytes": int(q.nbytes + a.nbytes), "rss_after_inputs_bytes": inputs_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "full_matrix_bytes": queries * archive * 4,
        "map_at_10_random": float(np.nanmean(metrics["map@10"])) if 10 in ks else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = cli.new_parser("python -m benchmarks.retrieval", __doc__)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--archive", type=int, default=240_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--query_block", type=int, default=1024)
    parser.add_argument("--archive_block", type=int, default=8192)
    parser.add_argument("--output", default=None,
                        help="JSON path (default: benchmarks/results/retrieval[_quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.archive, args.dim, args.k = 200, 3000, 64, 100
        args.query_block, args.archive_block = 64, 1024
    output = Path(args.output or RESULTS_DIR / f"retrieval{'_quick' if args.quick else ''}.json")
    info = machine_info()
    print(f"Machine: {describe_machine(info)}", flush=True)
    result = run(args.queries, args.archive, args.dim, args.k, args.query_block,
                 args.archive_block)
    rows = [[f"{result['queries']:,} x {result['archive']:,}", result["dim"], result["k"],
             f"{result['topk_seconds']:.1f}", f"{result['similarities_per_second'] / 1e6:.0f}",
             f"{result['metrics_seconds']:.1f}", f"{result['inputs_bytes'] / GIB:.2f}",
             f"{result['peak_rss_bytes'] / GIB:.2f}", f"{result['full_matrix_bytes'] / GIB:.1f}"]]
    print(format_table(["queries x archive", "d", "k", "top-k s", "M sims/s", "metrics s",
                        "inputs GiB", "peak RSS GiB", "full matrix GiB"], rows))
    write_json(output, {"benchmark": "retrieval", "quick": args.quick, "machine": info,
                        "result": result})
    print(f"Wrote {output}")


if __name__ == "__main__":  # the convention of data_builders.cli: one `error:` line
    sys.exit(cli.run(main))
