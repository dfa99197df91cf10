"""Content-based image retrieval with the embeddings of an export: precision, mAP and NDCG at k.

A query patch ranks the archive by cosine similarity of embeddings (both L2-normalised); an
archive patch is *relevant* when it shares at least one label with the query. Modes (which
embedder output the query and the archive use, see ``mosaic_jax.export``):

| mode | query | archive |
|---|---|---|
| ``fused`` | ``embedding`` | ``embedding`` |
| ``s1`` | ``h_s1`` | ``h_s1`` |
| ``s2`` | ``h_s2`` | ``h_s2`` |
| ``s1_to_s2`` | ``inter_s1`` | ``inter_s2`` |
| ``s2_to_s1`` | ``inter_s2`` | ``inter_s1`` |

The cross-modal modes use the inter-modal projections, the space the inter-modal contrastive
term aligns (the encoder features of the two towers are not aligned, and may differ in size).
Single-tower exports have ``embedding`` only, exports made before the inter-modal projections
were exported lack ``inter_*``: a mode asked for whose output is missing stops with an error
naming it; by default every mode the embeddings allow is evaluated.

Definitions, for a query q with label set Y_q and the ranked archive a_1, a_2, ... (a_i's label
set Y_i), rel_i = [|Y_q & Y_i| >= 1], cut-off k:

- ``precision@k`` = (1/k) sum_{i<=k} rel_i;
- ``map@k``: the mean over queries of AP@k = (1/R_k) sum_{i<=k} rel_i * precision@i, where R_k
  = sum_{i<=k} rel_i is the number of relevant patches retrieved (AP@k = 0 when R_k = 0);
- ``ndcg@k`` = DCG@k / IDCG@k with DCG@k = sum_{i<=k} (2^g_i - 1) / log2(i + 1) and graded
  relevance g_i = |Y_q & Y_i| (``gain="shared"``, the default: the number of shared labels) or
  |Y_q & Y_i| / |Y_q | Y_i| (``gain="jaccard"``); IDCG@k is the DCG of the best possible
  ranking of the whole archive.

Ties: archive patches with equal similarity are ranked in archive order (lower index first),
as a stable sort of the negated similarities would. Queries without any label have no relevant
patch and are left out of every mean (their number is reported). With ``exclude_self`` (query
and archive are the same split) a query never retrieves itself, nor counts in its ideal ranking.
Per-class values are means over the queries that carry the class. Whether query and archive
are one set is decided by their content (patch ids, else every array), not by file names, so a
copy or a link of the archive file is recognised. Rows whose embedding has a NaN or an inf are
left out (queries and archive, per mode) and counted in the results and on the console: a NaN
similarity would rank first. ``chance_precision`` beside the metrics is the precision of a
random ranking (the share of the archive relevant to a query, averaged over the queries).

Scale: `top_k_similar` never builds the query x archive similarity matrix. Queries stay on the
accelerator, the archive is streamed in blocks; for each block the similarities of one query
block at a time are merged into a running top-k (exact ``jax.lax.top_k`` over the k kept plus
the block's candidates; ``approx=True`` uses ``jax.lax.approx_max_k``, recall ~0.95 on TPU,
exact elsewhere). Device memory: queries + the [Q, k] running result + one archive block +
one [query_block, archive_block] similarity tile.

``python -m mosaic_jax retrieval --export DIR --dataset bigearthnet_v2 --query_split test
--archive_split train --data_dir D --output OUT`` (or ``--query_npz/--archive_npz`` from
``mosaic_jax.inference.embed``) writes ``OUT/retrieval.json`` (all numbers, per mode, overall
and per class) and ``OUT/retrieval.md`` (the same as tables), atomically.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_builders import atomic_files, cli
from mosaic_jax.evaluation.tables import markdown_table, table_lines
from mosaic_jax.inference.embed import embed_split

MODES: dict[str, tuple[str, str]] = {
    "fused": ("embedding", "embedding"),
    "s1": ("h_s1", "h_s1"),
    "s2": ("h_s2", "h_s2"),
    "s1_to_s2": ("inter_s1", "inter_s2"),
    "s2_to_s1": ("inter_s2", "inter_s1"),
}
_OUTPUT_KEYS = {k for pair in MODES.values() for k in pair}
GAINS = ("shared", "jaccard")
METRICS = ("precision", "map", "ndcg")
RESULTS_FILE = "retrieval.json"
DEFAULT_KS = (10, 100, 1000)
CHANCE = "chance_precision"
CHANCE_NOTE = ("`chance_precision`: the precision@k a random ranking has at any k, the share "
               "of the archive relevant to a query, averaged like the other columns.")


# ----------------------------------------------------------------------------------------------
# Blocked top-k on the accelerator.


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "approx"), donate_argnums=(0, 1))
def _merge_block(top_s: jax.Array, top_i: jax.Array, queries: jax.Array, exclude: jax.Array,
                 block: jax.Array, start: jax.Array, n_valid: jax.Array, *, k: int,
                 approx: bool) -> tuple[jax.Array, jax.Array]:
    """Merges one archive block into the running top-k of every query block.

    top_s/top_i [nq, qb, k], queries [nq, qb, d] (normalised), exclude [nq, qb] (archive index a
    query must not retrieve, -1 none), block [ab, d] (rows >= n_valid are padding), start: the
    block's first archive index.
    """
    block = _normalize(block)
    ids = start + jnp.arange(block.shape[0], dtype=jnp.int32)

    def one(args):
        s, i, q, ex = args
        sims = jnp.dot(q, block.T, precision=jax.lax.Precision.HIGHEST)
        drop = (ids[None, :] >= start + n_valid) | (ids[None, :] == ex[:, None])
        sims = jnp.where(drop, -jnp.inf, sims)
        # Kept entries first: lax.top_k puts the lower position first among equal values, so
        # ties keep archive order across blocks too.
        cat_s = jnp.concatenate([s, sims], axis=1)
        cat_i = jnp.concatenate([i, jnp.broadcast_to(ids, sims.shape)], axis=1)
        if approx:
            new_s, pos = jax.lax.approx_max_k(cat_s, k)
        else:
            new_s, pos = jax.lax.top_k(cat_s, k)
        return new_s, jnp.take_along_axis(cat_i, pos, axis=1)

    return jax.lax.map(one, (top_s, top_i, queries, exclude))


def top_k_similar(queries: np.ndarray, archive: np.ndarray, k: int, *, query_block: int = 1024,
                  archive_block: int = 8192, exclude: np.ndarray | None = None,
                  approx: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k archive rows most cosine-similar to each query, best first.

    Args:
      queries: [Q, d] embeddings (any float dtype); archive: [A, d], a numpy array (or memmap)
        that is read one block of ``archive_block`` rows at a time.
      k: results per query, 1 <= k <= A (minus one with ``exclude``).
      query_block: queries per similarity tile (memory: query_block x archive_block floats).
      exclude: optional int [Q], the archive index each query must not retrieve (-1: none).
      approx: ``jax.lax.approx_max_k`` instead of the exact ``jax.lax.top_k``.

    Returns:
      (similarities float32 [Q, k], archive indices int64 [Q, k]); equal similarities in
      archive order.
    """
    queries = np.asarray(queries)
    if queries.ndim != 2 or archive.ndim != 2 or queries.shape[1] != archive.shape[1]:
        raise ValueError(f"queries [Q, d] and archive [A, d] must share d; got "
                         f"{queries.shape} and {archive.shape}")
    q, a = queries.shape[0], archive.shape[0]
    if q == 0 or a == 0:
        raise ValueError(f"no {'queries' if q == 0 else 'archive patches'} (0 rows) to rank")
    available = a - (1 if exclude is not None and np.any(exclude >= 0) else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be between 1 and the {available} archive patches a query "
                         "can retrieve")
    if a >= 2**31:
        raise ValueError(f"archive of {a} rows: indices must fit int32")
    if query_block < 1 or archive_block < 1:
        raise ValueError(f"query_block and archive_block must be >= 1, got {query_block}, "
                         f"{archive_block}")
    qb = min(query_block, q)
    nq = -(-q // qb)
    pad = nq * qb - q
    qs = _normalize(jnp.asarray(np.pad(queries, ((0, pad), (0, 0)))).reshape(nq, qb, -1))
    ex = np.full(q, -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
    if ex.shape != (q,):
        raise ValueError(f"exclude must have shape [{q}], got {ex.shape}")
    ex = jnp.asarray(np.pad(ex, (0, pad), constant_values=-1).reshape(nq, qb))
    top_s = jnp.full((nq, qb, k), -jnp.inf, jnp.float32)
    top_i = jnp.full((nq, qb, k), -1, jnp.int32)
    ab = min(archive_block, a)
    for start in range(0, a, ab):
        block = np.asarray(archive[start:start + ab])
        n_valid = block.shape[0]
        if n_valid < ab:
            block = np.pad(block, ((0, ab - n_valid), (0, 0)))
        top_s, top_i = _merge_block(top_s, top_i, qs, ex, jnp.asarray(block),
                                    jnp.int32(start), jnp.int32(n_valid), k=k, approx=approx)
    sims = np.asarray(top_s).reshape(nq * qb, k)[:q]
    idx = np.asarray(top_i).reshape(nq * qb, k)[:q].astype(np.int64)
    return sims, idx


# ----------------------------------------------------------------------------------------------
# Metrics (NumPy).


def _gain(shared: np.ndarray, size_q: np.ndarray, size_a: np.ndarray, gain: str) -> np.ndarray:
    """Graded relevance from shared label counts; float64 in [0, C] or [0, 1]."""
    shared = shared.astype(np.float64)
    if gain == "shared":
        return shared
    union = size_q + size_a - shared
    return np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)


def _discount_cumsum(n: int) -> np.ndarray:
    """D[m] = sum_{i=1..m} 1 / log2(i + 1), m = 0..n."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, n + 2)))])


def _ideal_dcg(query_labels: np.ndarray, combos: np.ndarray, counts: np.ndarray,
               has_self: np.ndarray, ks: Sequence[int], gain: str) -> np.ndarray:
    """IDCG@k [Q, len(ks)] over an archive given as distinct label sets with their counts.

    ``combos`` [U, C] bool, ``counts`` [U]; ``has_self`` [Q] bool: the query itself is in the
    archive and is left out once. Both gains depend only on the number of shared labels and the
    archive set's size, so the archive is counted into (C + 1)^2 such bins per query; the best
    ranking takes the bins by decreasing gain, and a bin of ``n`` patches at ranks
    start+1..start+n adds (2^g - 1) (D[end] - D[start]).
    """
    q, c = query_labels.shape
    side = c + 1
    inter = np.rint(query_labels.astype(np.float32) @ combos.T.astype(np.float32)).astype(np.int64)
    key = inter * side + combos.sum(1)[None, :]
    flat = (np.arange(q)[:, None] * side * side + key).ravel()
    weights = np.broadcast_to(counts.astype(np.float64), key.shape).ravel()
    n = np.bincount(flat, weights=weights, minlength=q * side * side).reshape(q, side * side)
    size_q = query_labels.sum(1)
    rows = np.flatnonzero(has_self)
    n[rows, size_q[rows] * side + size_q[rows]] -= 1
    bins = np.arange(side * side)
    g = _gain(np.broadcast_to(bins // side, n.shape), size_q[:, None], bins % side, gain)
    order = np.argsort(-g, axis=1, kind="stable")
    g = np.take_along_axis(g, order, axis=1)
    n = np.take_along_axis(n, order, axis=1).astype(np.int64)
    end = np.cumsum(n, axis=1)
    start = end - n
    disc = _discount_cumsum(max(ks))
    out = np.empty((q, len(ks)))
    for j, k in enumerate(ks):
        span = disc[np.minimum(end, k)] - disc[np.minimum(start, k)]
        out[:, j] = ((2.0 ** g - 1.0) * span).sum(1)
    return out


def per_query_metrics(query_labels: np.ndarray, archive_labels: np.ndarray, ranked: np.ndarray,
                      ks: Sequence[int], *, gain: str = "shared",
                      self_index: np.ndarray | None = None, block: int = 1024
                      ) -> dict[str, np.ndarray]:
    """precision@k, AP@k and NDCG@k of every query (see the module docstring).

    Args:
      query_labels: bool [Q, C]; archive_labels: bool [A, C].
      ranked: int [Q, K] archive indices, best first, K >= max(ks).
      ks: cut-offs.
      gain: NDCG's graded relevance, "shared" (number of shared labels) or "jaccard".
      self_index: int [Q], the archive index of the query itself (-1 none): it is left out of
        the ideal ranking (it must not be in ``ranked``).
      block: queries processed at once (memory ~ block x K x C bytes).

    Returns:
      {"precision@k", "map@k", "ndcg@k": float64 [Q] for each k, "valid": bool [Q]} (valid:
      the query has a label; values of invalid queries are NaN).
    """
    query_labels = np.asarray(query_labels, bool)
    archive_labels = np.asarray(archive_labels, bool)
    ranked = np.asarray(ranked)
    ks = [int(k) for k in ks]
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
    if not ks or min(ks) < 1 or ranked.ndim != 2 or max(ks) > ranked.shape[1]:
        raise ValueError(f"every k in {ks} must be in 1..{ranked.shape[-1]} (results per query)")
    if query_labels.shape[1] != archive_labels.shape[1] or len(ranked) != len(query_labels):
        raise ValueError(f"label shapes {query_labels.shape} (query), {archive_labels.shape} "
                         f"(archive) and ranking {ranked.shape} do not fit")
    q = len(query_labels)
    own = np.full(q, -1) if self_index is None else np.asarray(self_index)
    combos, counts = np.unique(archive_labels, axis=0, return_counts=True)
    # The ideal ranking depends only on the query's label set (and whether it is in the
    # archive): computed once per distinct pair.
    pairs, which = np.unique(np.concatenate([query_labels, (own >= 0)[:, None]], axis=1),
                             axis=0, return_inverse=True)
    idcg = np.concatenate([_ideal_dcg(pairs[lo:lo + block, :-1], combos, counts,
                                      pairs[lo:lo + block, -1], ks, gain)
                           for lo in range(0, len(pairs), block)])[which.reshape(-1)]
    size_a = archive_labels.sum(1)
    kmax = max(ks)
    positions = np.arange(1, kmax + 1)
    discounts = 1.0 / np.log2(positions + 1)
    out = {f"{m}@{k}": np.full(q, np.nan) for m in METRICS for k in ks}
    valid = query_labels.any(1)
    for lo in range(0, q, block):
        sl = slice(lo, min(lo + block, q))
        yq, r = query_labels[sl], ranked[sl, :kmax]
        shared = (archive_labels[r] & yq[:, None, :]).sum(-1)
        rel = shared > 0
        hits = np.cumsum(rel, axis=1)
        g = _gain(shared, yq.sum(1, keepdims=True), size_a[r], gain)
        dcg = np.cumsum((2.0 ** g - 1.0) * discounts, axis=1)
        prec_sum = np.cumsum(rel * hits / positions, axis=1)
        ok = valid[sl]
        for j, k in enumerate(ks):
            hk = hits[:, k - 1]
            ap = np.divide(prec_sum[:, k - 1], hk, out=np.zeros(len(hk)), where=hk > 0)
            ndcg = np.divide(dcg[:, k - 1], idcg[sl, j], out=np.zeros(len(hk)),
                             where=idcg[sl, j] > 0)
            out[f"precision@{k}"][sl] = np.where(ok, hk / k, np.nan)
            out[f"map@{k}"][sl] = np.where(ok, ap, np.nan)
            out[f"ndcg@{k}"][sl] = np.where(ok, ndcg, np.nan)
    out["chance_precision"] = np.where(valid, _chance_precision(query_labels, combos, counts,
                                                                own >= 0), np.nan)
    out["valid"] = valid
    return out


def _chance_precision(query_labels: np.ndarray, combos: np.ndarray, counts: np.ndarray,
                      has_self: np.ndarray) -> np.ndarray:
    """The precision of a random ranking, float64 [Q]: the fraction of the archive (the query
    itself left out when ``has_self``) that shares a label with the query.

    ``combos`` [U, C] bool and ``counts`` [U]: the archive's distinct label sets and their
    numbers. The archive patches sharing no label with a query are those whose label set lies
    in the query's complement: for C <= 20 one subset-sum table over the 2^C label sets gives
    every such count at once; above, a blocked [block, U] overlap test.
    """
    c = query_labels.shape[1]
    total = float(counts.sum())
    if c <= 20:
        weights = np.int64(1) << np.arange(c, dtype=np.int64)
        within = np.zeros(1 << c, np.float64)  # within[m]: archive sets that are subsets of m
        np.add.at(within, combos.astype(np.int64) @ weights, counts)
        for bit in range(c):
            view = within.reshape(-1, 2, 1 << bit)
            view[:, 1, :] += view[:, 0, :]
        disjoint = within[(~query_labels).astype(np.int64) @ weights]
    else:
        block = max(1, (1 << 24) // max(len(combos), 1))
        disjoint = np.concatenate([
            (query_labels[lo:lo + block].astype(np.float32) @ combos.T.astype(np.float32) == 0)
            @ counts.astype(np.float64) for lo in range(0, len(query_labels), block)]
            or [np.zeros(0)])
    own = has_self & query_labels.any(1)
    available = total - has_self
    return np.divide(total - disjoint - own, available, out=np.zeros(len(query_labels)),
                     where=available > 0)


def summarize(per_query: Mapping[str, np.ndarray], query_labels: np.ndarray,
              class_names: Sequence[str]) -> dict[str, Any]:
    """Means over valid queries, overall and per class (queries that carry the class).

    Returns {"num_queries", "num_queries_without_labels", "overall": {metric: float},
    "per_class": {class: {"num_queries": int, metric: float or None}}}.
    """
    valid = np.asarray(per_query["valid"])
    keys = [k for k in per_query if k != "valid"]
    overall = {k: float(np.mean(per_query[k][valid])) if valid.any() else None for k in keys}
    per_class = {}
    for c, name in enumerate(class_names):
        rows = valid & np.asarray(query_labels[:, c], bool)
        per_class[name] = {"num_queries": int(rows.sum()),
                           **{k: float(np.mean(per_query[k][rows])) if rows.any() else None
                              for k in keys}}
    return {"num_queries": int(valid.size), "num_queries_without_labels": int((~valid).sum()),
            "overall": overall, "per_class": per_class}


# ----------------------------------------------------------------------------------------------
# Evaluation of embedding sets, and the result files.


def available_modes(query: Mapping[str, Any], archive: Mapping[str, Any]) -> list[str]:
    """Modes whose query and archive outputs are both present."""
    return [m for m, (kq, ka) in MODES.items() if kq in query and ka in archive]


def check_modes(modes: Sequence[str], query: Mapping[str, Any], archive: Mapping[str, Any],
                query_name: str, archive_name: str) -> None:
    """ValueError naming the mode and the missing output (and where it was looked for)."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}; valid: {', '.join(MODES)}")
        for key, data, name in ((MODES[mode][0], query, query_name),
                                (MODES[mode][1], archive, archive_name)):
            if key not in data:
                why = ("single-tower models have only 'embedding'" if key.startswith("h_") else
                       "exports of two-tower models made by this version have it; "
                       "single-tower ones never do")
                raise ValueError(f"mode {mode!r} needs the embedder output {key!r}, which "
                                 f"{name} does not have ({why}); its outputs: "
                                 f"{', '.join(sorted(k for k in data if k in _OUTPUT_KEYS))}")


def finite_rows(x: Any, block: int = 65536) -> np.ndarray:
    """bool [N]: the rows of the [N, d] array ``x`` whose values are all finite (read in blocks
    of ``block`` rows, so a memmap is never loaded whole)."""
    return np.concatenate([np.isfinite(np.asarray(x[lo:lo + block])).all(axis=1)
                           for lo in range(0, len(x), block)] or [np.zeros(0, bool)])


def same_content(query: Mapping[str, Any], archive: Mapping[str, Any]) -> bool:
    """Whether two embedding sets are the same set of patches, by content, not by file name:
    equal ``patch_id`` arrays when both have them, else every array equal (keys, shapes,
    dtypes, bytes). A copy or a link of one file is the same set; two splits are not."""
    if "patch_id" in query and "patch_id" in archive:
        return np.array_equal(np.asarray(query["patch_id"]), np.asarray(archive["patch_id"]))
    if set(query) != set(archive):
        return False
    for key in query:
        a, b = np.asarray(query[key]), np.asarray(archive[key])
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            return False
    return True


def check_sizes(query: Mapping[str, Any], archive: Mapping[str, Any], query_name: str,
                archive_name: str) -> None:
    """ValueError naming the file when a set has no row, or arrays whose row counts differ."""
    for data, name in ((query, query_name), (archive, archive_name)):
        n = len(data["labels"])
        if n == 0:
            raise ValueError(f"{name} holds no patch (0 rows): nothing to retrieve "
                             f"{'with' if data is query else 'from'}")
        wrong = [k for k in sorted(_OUTPUT_KEYS | {"index", "patch_id"})
                 if k in data and len(data[k]) != n]
        if wrong:
            raise ValueError(f"{name}: {', '.join(wrong)} must have one row per label row "
                             f"({n}); got {[len(data[k]) for k in wrong]}")


def _self_index(query: Mapping[str, np.ndarray], archive: Mapping[str, np.ndarray]
                ) -> np.ndarray:
    """int [Q]: each query's position in the archive (-1 none), by ``index``."""
    if "index" not in query or "index" not in archive:
        raise ValueError("exclude_self finds each query in the archive by its 'index' "
                         "(position in the split, written by mosaic_jax.inference.embed); the "
                         "query or the archive has none")
    position = {int(i): p for p, i in enumerate(np.asarray(archive["index"]))}
    return np.asarray([position.get(int(i), -1) for i in np.asarray(query["index"])], np.int64)


def _evaluate_mode(query: Mapping[str, np.ndarray], archive: Mapping[str, np.ndarray],
                   mode: str, *, ks: Sequence[int], gain: str, exclude_self: bool,
                   names: Sequence[str], **top_k: Any) -> dict[str, Any]:
    """One mode's `summarize` result. Rows whose embedding is not finite (NaN, inf: a diverged
    model, a bad input patch) are left out, queries and archive alike, and counted
    (``num_queries_non_finite``, ``num_archive_non_finite``): a NaN similarity would otherwise
    rank first."""
    kq, ka = MODES[mode]
    q_ok, a_ok = finite_rows(query[kq]), finite_rows(archive[ka])
    if not q_ok.any() or not a_ok.any():
        which = "query" if not q_ok.any() else "archive"
        raise ValueError(f"mode {mode!r}: no {which} embedding ({kq if which == 'query' else ka})"
                         " is finite (NaN or inf in every row): a diverged model?")
    yq, ya = np.asarray(query["labels"], bool), np.asarray(archive["labels"], bool)
    q_emb, a_emb = query[kq], archive[ka]
    self_index = _self_index(query, archive) if exclude_self else None
    if not a_ok.all():
        a_emb, ya = np.asarray(a_emb)[a_ok], ya[a_ok]
        if self_index is not None:
            new_position = np.where(a_ok, np.cumsum(a_ok) - 1, -1)
            self_index = np.where(self_index >= 0, new_position[self_index], -1)
    if not q_ok.all():
        q_emb, yq = np.asarray(q_emb)[q_ok], yq[q_ok]
        self_index = None if self_index is None else self_index[q_ok]
    available = len(ya) - (1 if self_index is not None and (self_index >= 0).any() else 0)
    if max(ks) > available:
        raise ValueError(f"k={max(ks)} is more than the {available} archive patches a query can "
                         f"retrieve in mode {mode!r}; pass smaller --ks")
    _, ranked = top_k_similar(q_emb, a_emb, max(ks), exclude=self_index, **top_k)
    pq = per_query_metrics(yq, ya, ranked, ks, gain=gain, self_index=self_index)
    return {"query_output": kq, "archive_output": ka, **summarize(pq, yq, names),
            "num_queries_non_finite": int((~q_ok).sum()),
            "num_archive_non_finite": int((~a_ok).sum())}


def evaluate(query: Mapping[str, np.ndarray], archive: Mapping[str, np.ndarray], *,
             modes: Sequence[str], ks: Sequence[int] = DEFAULT_KS, gain: str = "shared",
             exclude_self: bool = False, query_block: int = 1024, archive_block: int = 8192,
             approx: bool = False, class_names: Sequence[str] | None = None
             ) -> dict[str, Any]:
    """Retrieval metrics of every mode; arrays as `mosaic_jax.inference.embed` writes them.

    ``query``/``archive``: {output key: float [N, d], "labels": bool [N, C]} (and ``index``,
    used with ``exclude_self`` to find each query in the archive). Returns {"ks", "gain",
    "modes": {mode: `_evaluate_mode` result}, ...}; each mode's ``overall`` and ``per_class``
    include ``chance_precision``, the precision of a random ranking.
    """
    check_sizes(query, archive, "the query set", "the archive")
    yq, ya = np.asarray(query["labels"], bool), np.asarray(archive["labels"], bool)
    names = list(class_names if class_names is not None else
                 query.get("class_names", [f"class {c}" for c in range(yq.shape[1])]))
    ks = sorted({int(k) for k in ks})
    if exclude_self:
        _self_index(query, archive)  # the error before any work
    result: dict[str, Any] = {"ks": ks, "gain": gain, "similarity": "cosine",
                              "exclude_self": exclude_self, "approx_top_k": approx,
                              "num_archive": int(len(ya)), "class_names": names, "modes": {}}
    for mode in modes:
        result["modes"][mode] = _evaluate_mode(
            query, archive, mode, ks=ks, gain=gain, exclude_self=exclude_self, names=names,
            query_block=query_block, archive_block=archive_block, approx=approx)
    return result


def non_finite_lines(result: Mapping[str, Any]) -> list[str]:
    """One sentence per mode that left out rows with non-finite embeddings."""
    lines = []
    for mode, r in result["modes"].items():
        nq, na = r.get("num_queries_non_finite", 0), r.get("num_archive_non_finite", 0)
        if nq or na:
            lines.append(f"Mode {mode}: left out {nq} of {r['num_queries'] + nq} queries and "
                         f"{na} of {result['num_archive']} archive patches whose embeddings "
                         f"({r['query_output']}, {r['archive_output']}) are not finite "
                         "(NaN or inf).")
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.4f}"


def results_markdown(result: Mapping[str, Any]) -> str:
    """The overall table (one row per mode) and one per-class table per mode."""
    ks = result["ks"]
    cols = [f"{m}@{k}" for m in METRICS for k in ks]
    gain = ("number of shared labels" if result["gain"] == "shared" else
            "Jaccard overlap of the label sets")
    cols.append(CHANCE)
    lines = [f"# Retrieval ({result.get('query', 'query')} -> {result.get('archive', 'archive')})",
             "", f"Cosine similarity; relevant = shares at least one label; NDCG gain 2^g - 1 "
             f"with g the {gain}; {result['num_archive']} archive patches. {CHANCE_NOTE}", "",
             *[f"{line}\n" for line in non_finite_lines(result)]]
    align = ["left", *["right"] * (len(cols) + 1)]
    lines += table_lines(
        ["mode", "queries", *cols],
        [[mode, r["num_queries"] - r["num_queries_without_labels"],
          *(_fmt(r["overall"].get(c)) for c in cols)] for mode, r in result["modes"].items()],
        align)
    for mode, r in result["modes"].items():
        lines += ["", f"## Per class, mode {mode} ({r['query_output']} -> "
                  f"{r['archive_output']})", ""]
        lines += table_lines(
            ["class", "queries", *cols],
            [[name, row["num_queries"], *(_fmt(row.get(c)) for c in cols)]
             for name, row in r["per_class"].items()], align)
    return "\n".join(lines) + "\n"


def write_results(result: Mapping[str, Any], output: str) -> list[str]:
    """Writes ``retrieval.json`` and ``retrieval.md`` to the folder ``output``, atomically."""
    paths = [os.path.join(output, RESULTS_FILE), os.path.join(output, "retrieval.md")]
    atomic_files.write_atomic(paths[0], json.dumps(result, indent=1, allow_nan=False))
    atomic_files.write_atomic(paths[1], results_markdown(result))
    return paths


def load_results(workdir: str) -> dict[str, Any] | None:
    """``WORKDIR/retrieval/retrieval.json`` when the workdir has one, else None."""
    path = os.path.join(workdir, "retrieval", RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def report_table(named: Sequence[tuple[str, str, Mapping[str, Any]]]) -> tuple[str, str]:
    """(markdown, csv) of the retrieval results of several runs: one row per run x mode.

    ``named``: (method, dataset, `load_results` dict). Columns: the metrics at every k any of
    the runs has (empty where a run lacks that k).
    """
    ks = sorted({k for _, _, r in named for k in r["ks"]})
    cols = [f"{m}@{k}" for m in METRICS for k in ks] + [CHANCE]
    rows = [[method, dataset, mode, r.get("query", ""), r.get("archive", ""),
             *(m["overall"].get(c) for c in cols)]
            for method, dataset, r in named for mode, m in r["modes"].items()]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "dataset", "mode", "query", "archive", *cols])
    writer.writerows([[*row[:5], *("" if v is None else repr(v) for v in row[5:])]
                      for row in rows])
    md = markdown_table(["method", "dataset", "mode", *cols],
                        [[*row[:3], *(_fmt(v) for v in row[5:])] for row in rows],
                        ["left"] * 3 + ["right"] * len(cols))
    return md, buf.getvalue()


def report_files(runs: Sequence[Any]) -> tuple[dict[str, str], str | None]:
    """({file name: content}, report.md section) for `mosaic_jax.evaluation.report`: the
    retrieval table of the runs (``workdir``, ``method``, ``dataset``) whose workdir has retrieval
    results."""
    named = [(r.method, r.dataset, res) for r in runs
             if (res := load_results(r.workdir)) is not None]
    if not named:
        return {}, None
    md, table = report_table(named)
    note = ("Cosine similarity; relevant = shares at least one label; NDCG gain from the "
            "number of shared labels or their Jaccard overlap (each run's `gain`); from each "
            f"workdir's `retrieval/retrieval.json`. {CHANCE_NOTE}\n\n")
    return ({"retrieval.md": f"# Retrieval\n\n{note}{md}", "retrieval.csv": table},
            f"## Retrieval\n\n{note}{md}")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file {path!r} does not exist (write it with "
                                "python -m mosaic_jax embed)")
    try:
        with np.load(path) as f:
            data = dict(f)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated or not .npz
        raise ValueError(f"{path} is not a readable .npz file ({e}): write it again with "
                         "python -m mosaic_jax embed") from e
    if "labels" not in data:
        raise ValueError(f"{path} has no 'labels' array: not written by "
                         "mosaic_jax.inference.embed?")
    return data


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m mosaic_jax retrieval", __doc__)
    parser.add_argument("--export", help="export folder: embed the two splits with it")
    parser.add_argument("--dataset", default=None, help="TFDS name (default: the export's)")
    parser.add_argument("--query_split", default="test", help="TFDS split of the queries")
    parser.add_argument("--archive_split", default="train", help="TFDS split of the archive")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets",
                        help="TFDS data directory of the prepared dataset")
    parser.add_argument("--query_npz",
                        help="queries from mosaic_jax.inference.embed (instead of --export)")
    parser.add_argument("--archive_npz", help="archive from mosaic_jax.inference.embed")
    parser.add_argument("--output", required=True, help="folder for retrieval.json and .md")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: every mode the embeddings allow")
    parser.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS),
                        help="cut-offs k")
    parser.add_argument("--gain", choices=GAINS, default="shared",
                        help="NDCG graded relevance: shared label count or Jaccard")
    parser.add_argument("--exclude_self", choices=("auto", "yes", "no"), default="auto",
                        help="a query never retrieves itself (auto: when both are one split)")
    parser.add_argument("--query_block", type=int, default=1024)
    parser.add_argument("--archive_block", type=int, default=8192)
    parser.add_argument("--approx", action="store_true",
                        help="jax.lax.approx_max_k instead of the exact top-k")
    parser.add_argument("--batch_size", type=int, default=256, help="embedder batch size")
    parser.add_argument("--max_batches", type=int, default=0,
                        help="embed at most this many batches per split (0: all)")
    args = parser.parse_args(argv)
    if bool(args.export) == bool(args.query_npz or args.archive_npz):
        parser.error("give either --export or both --query_npz and --archive_npz")
    if not args.export and not (args.query_npz and args.archive_npz):
        parser.error("--query_npz and --archive_npz go together")
    if min(args.ks) < 1:
        parser.error(f"--ks must be >= 1, got {args.ks}")
    cli.run(lambda: _run(args), argv, paths=[args.output])


def _run(args: argparse.Namespace) -> None:
    """The work of `main` on its parsed flags: embed or load, evaluate, write, print."""
    for flag, path in (("--query_npz", args.query_npz), ("--archive_npz", args.archive_npz)):
        if path:
            cli.check_input(path, flag)
    cli.check_output(args.output, folder=True)
    if args.export:
        def embed(split):
            return embed_split(args.export, split=split, data_dir=args.data_dir,
                               dataset=args.dataset, batch_size=args.batch_size,
                               patch_ids=False, max_batches=args.max_batches)

        query_name = f"split {args.query_split} of {args.export}"
        archive_name = f"split {args.archive_split} of {args.export}"
        query = embed(args.query_split)
        archive = query if args.archive_split == args.query_split else embed(
            args.archive_split)
    else:
        query_name, archive_name = args.query_npz, args.archive_npz
        query, archive = _load_npz(args.query_npz), _load_npz(args.archive_npz)
    check_sizes(query, archive, query_name, archive_name)
    same = archive is query or same_content(query, archive)
    modes = args.modes or available_modes(query, archive)
    check_modes(modes, query, archive, query_name, archive_name)
    exclude = same if args.exclude_self == "auto" else args.exclude_self == "yes"
    result = evaluate(query, archive, modes=modes, ks=args.ks, gain=args.gain,
                      exclude_self=exclude, query_block=args.query_block,
                      archive_block=args.archive_block, approx=args.approx)
    result["query"], result["archive"] = query_name, archive_name
    skipped = [m for m in MODES if m not in available_modes(query, archive)]
    result["skipped_modes"] = skipped
    paths = write_results(result, args.output)
    print(results_markdown(result).split("\n## ")[0])
    for line in non_finite_lines(result):
        print(f"warning: {line}")
    if skipped:
        print(f"Skipped modes (outputs missing): {', '.join(skipped)}")
    print(f"Wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
