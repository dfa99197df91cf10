"""Retrieval: blocked top-k against a full sort, every metric against a brute-force reference,
a hand-computed example, the modes and the command line."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mosaic_jax.evaluation import retrieval


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _full_ranking(q, a, exclude=None):
    """Stable argsort of the negated cosine similarities (float64), self removed."""
    sims = _unit(q.astype(np.float64)) @ _unit(a.astype(np.float64)).T
    if exclude is not None:
        sims[np.arange(len(q))[exclude >= 0], exclude[exclude >= 0]] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable"), sims


@pytest.mark.parametrize("qb,ab", [(7, 13), (64, 500), (1, 1000)])
def test_blocked_top_k_equals_a_full_argsort(qb, ab):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 24)).astype(np.float32)
    a = rng.normal(size=(301, 24)).astype(np.float32)
    sims, idx = retrieval.top_k_similar(q, a, 50, query_block=qb, archive_block=ab)
    order, full = _full_ranking(q, a)
    assert idx.shape == (37, 50) and idx.dtype == np.int64 and sims.dtype == np.float32
    np.testing.assert_array_equal(idx, order[:, :50])
    np.testing.assert_allclose(sims, np.take_along_axis(full, order[:, :50], 1), atol=1e-6)


def test_ties_keep_archive_order_and_self_is_excluded():
    # Unit vectors with entries in {0, +-1/2} (4 non-zeros): similarities are exact multiples
    # of 1/4, so many are equal; ties must come in archive order, across blocks too.
    rng = np.random.default_rng(1)

    def vectors(n):
        x = np.zeros((n, 8), np.float32)
        for row in x:
            row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return x

    a = vectors(90)
    q = a[:20]
    exclude = np.arange(20)
    _, idx = retrieval.top_k_similar(q, a, 30, query_block=6, archive_block=11, exclude=exclude)
    order, sims = _full_ranking(q, a, exclude)
    assert len(np.unique(np.round(sims, 6))) < 12  # there are ties to break
    np.testing.assert_array_equal(idx, order[:, :30])
    assert not (idx == exclude[:, None]).any()


def test_top_k_rejects_bad_arguments():
    a = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="k=6"):
        retrieval.top_k_similar(a, a, 6)
    with pytest.raises(ValueError, match="k=5"):
        retrieval.top_k_similar(a, a, 5, exclude=np.arange(5))
    with pytest.raises(ValueError, match="share d"):
        retrieval.top_k_similar(np.zeros((2, 4)), a, 2)


def test_approximate_top_k_finds_most_neighbours():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(16, 8)).astype(np.float32)
    a = rng.normal(size=(400, 8)).astype(np.float32)
    _, approx = retrieval.top_k_similar(q, a, 20, archive_block=128, approx=True)
    _, exact = retrieval.top_k_similar(q, a, 20, archive_block=128)
    recall = np.mean([len(set(x) & set(y)) / 20 for x, y in zip(approx, exact, strict=True)])
    assert recall >= 0.9


def _reference(yq, ya, order, ks, gain, self_index):
    """Brute-force metrics, one query and one rank at a time."""
    out = {f"{m}@{k}": [] for m in retrieval.METRICS for k in ks}
    for i, y in enumerate(yq):
        if not y.any():
            for key in out:
                out[key].append(np.nan)
            continue
        ranking = [j for j in order[i] if j != self_index[i]]

        def g(j, y=y):
            shared = float(np.sum(y & ya[j]))
            return shared if gain == "shared" else shared / float(np.sum(y | ya[j]))

        ideal = sorted((g(j) for j in range(len(ya)) if j != self_index[i]), reverse=True)
        for k in ks:
            rel = [bool(np.any(y & ya[j])) for j in ranking[:k]]
            hits, ap = 0, 0.0
            for r, is_rel in enumerate(rel, start=1):
                if is_rel:
                    hits += 1
                    ap += hits / r
            dcg = sum((2 ** g(j) - 1) / math.log2(r + 1) for r, j in enumerate(ranking[:k], 1))
            idcg = sum((2 ** v - 1) / math.log2(r + 1) for r, v in enumerate(ideal[:k], 1))
            out[f"precision@{k}"].append(sum(rel) / k)
            out[f"map@{k}"].append(ap / hits if hits else 0.0)
            out[f"ndcg@{k}"].append(dcg / idcg if idcg > 0 else 0.0)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("gain", ["shared", "jaccard"])
@pytest.mark.parametrize("same_split", [False, True])
def test_metrics_equal_a_brute_force_reference(gain, same_split):
    rng = np.random.default_rng(3)
    ya = rng.random((120, 6)) < 0.3
    qa = rng.normal(size=(120, 5)).astype(np.float32)
    if same_split:
        yq, q, self_index = ya[:40], qa[:40], np.arange(40)
    else:
        yq, q, self_index = rng.random((40, 6)) < 0.3, rng.normal(size=(40, 5)), np.full(40, -1)
    yq[0] = False  # a query without labels: left out
    ks = [1, 5, 17, 60]
    _, ranked = retrieval.top_k_similar(q, qa, 60, archive_block=32,
                                        exclude=self_index if same_split else None)
    got = retrieval.per_query_metrics(yq, ya, ranked, ks, gain=gain,
                                      self_index=self_index if same_split else None, block=7)
    order, _ = _full_ranking(q, qa)
    ref = _reference(yq, ya, order, ks, gain, self_index)
    assert got["valid"].tolist() == yq.any(1).tolist()
    for key, values in ref.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-12, atol=1e-12, err_msg=key)
    summary = retrieval.summarize(got, yq, [f"c{c}" for c in range(6)])
    assert summary["num_queries_without_labels"] == int((~yq.any(1)).sum())
    for key, values in ref.items():
        assert summary["overall"][key] == pytest.approx(np.nanmean(values), rel=1e-12)
        for c in range(6):
            rows = yq[:, c]
            want = np.mean(values[rows]) if rows.any() else None
            assert summary["per_class"][f"c{c}"][key] == pytest.approx(want, rel=1e-12)


def _five_item_example():
    """Query labels {A, B}; archive in similarity order: {A}, {C}, {A, B}, {B, C}, {C}."""
    angles = np.radians([0, 10, 20, 30, 40])
    archive = {"embedding": np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32),
               "labels": np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 1]], bool)}
    query = {"embedding": np.array([[1.0, 0.0]], np.float32),
             "labels": np.array([[1, 1, 0]], bool)}
    return query, archive


@pytest.mark.parametrize("gain", ["shared", "jaccard"])
def test_a_hand_computed_five_item_example(gain):
    query, archive = _five_item_example()
    result = retrieval.evaluate(query, archive, modes=["fused"], ks=[3, 5], gain=gain,
                                class_names=["A", "B", "C"])
    m = result["modes"]["fused"]["overall"]
    # Relevant at ranks 1, 3, 4.
    assert m["precision@3"] == pytest.approx(2 / 3)
    assert m["precision@5"] == pytest.approx(3 / 5)
    assert m["map@3"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m["map@5"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 4) / 3)
    if gain == "shared":  # shared labels 1, 0, 2, 1, 0; gains 2^g - 1 = 1, 0, 3, 1, 0
        dcg3, dcg5 = 1 + 3 / 2, 1 + 3 / 2 + 1 / math.log2(5)
        idcg = 3 + 1 / math.log2(3) + 1 / 2           # ideal order 3, 1, 1, 0, 0
    else:  # Jaccard 1/2, 0, 1, 1/3, 0
        g = [2 ** 0.5 - 1, 0, 1, 2 ** (1 / 3) - 1, 0]
        dcg3, dcg5 = g[0] + g[2] / 2, g[0] + g[2] / 2 + g[3] / math.log2(5)
        idcg = g[2] + g[0] / math.log2(3) + g[3] / 2  # ideal order 1, 1/2, 1/3
    assert m["ndcg@3"] == pytest.approx(dcg3 / idcg)
    assert m["ndcg@5"] == pytest.approx(dcg5 / idcg)
    per_class = result["modes"]["fused"]["per_class"]
    assert per_class["A"]["precision@3"] == pytest.approx(2 / 3)
    assert per_class["C"] == {"num_queries": 0, **{k: None for k in m}}


def test_cross_modal_modes_pair_the_inter_modal_projections():
    rng = np.random.default_rng(4)
    n = 30
    shared = rng.normal(size=(n, 6)).astype(np.float32)
    labels = rng.random((n, 4)) < 0.4
    # inter_s1 of patch i equals inter_s2 of patch i; the encoder features are unrelated and of
    # other sizes, so only a cross-modal mode built on inter_* finds the partner first.
    data = {"embedding": rng.normal(size=(n, 10)), "h_s1": rng.normal(size=(n, 4)),
            "h_s2": rng.normal(size=(n, 5)), "inter_s1": shared,
            "inter_s2": shared + 1e-3 * rng.normal(size=(n, 6)).astype(np.float32),
            "labels": labels, "index": np.arange(n)}
    assert retrieval.available_modes(data, data) == list(retrieval.MODES)
    for mode in ("s1_to_s2", "s2_to_s1"):
        kq, ka = retrieval.MODES[mode]
        _, idx = retrieval.top_k_similar(data[kq], data[ka], 3)
        assert idx.shape == (n, 3)
        np.testing.assert_array_equal(idx[:, 0], np.arange(n))
    result = retrieval.evaluate(data, data, modes=["s1_to_s2", "s2", "fused"], ks=[1, 5])
    assert list(result["modes"]) == ["s1_to_s2", "s2", "fused"]
    assert result["modes"]["s1_to_s2"]["query_output"] == "inter_s1"
    assert result["modes"]["s1_to_s2"]["archive_output"] == "inter_s2"
    # Top-1 is the patch itself, relevant whenever it has a label.
    assert result["modes"]["s1_to_s2"]["overall"]["precision@1"] == 1.0


def test_missing_outputs_fail_for_those_modes_only():
    single = {"embedding": np.zeros((3, 4)), "labels": np.ones((3, 2), bool)}
    assert retrieval.available_modes(single, single) == ["fused"]
    retrieval.check_modes(["fused"], single, single, "q.npz", "a.npz")
    with pytest.raises(ValueError, match=r"mode 's1' needs the embedder output 'h_s1'.*q\.npz"):
        retrieval.check_modes(["s1"], single, single, "q.npz", "a.npz")
    with pytest.raises(ValueError, match="exclude_self finds each query .* 'index'"):
        retrieval.evaluate(single, single, modes=["fused"], ks=[1], exclude_self=True)
    old = {**single, "h_s1": np.zeros((3, 2)), "h_s2": np.zeros((3, 2))}
    with pytest.raises(ValueError, match=r"'s2_to_s1' needs the embedder output 'inter_s2'"):
        retrieval.check_modes(["s2_to_s1"], old, old, "q.npz", "a.npz")


def test_command_line_from_npz_files(tmp_path, capsys):
    rng = np.random.default_rng(5)

    def arrays(n, first):
        return {"embedding": rng.normal(size=(n, 8)).astype(np.float32),
                "h_s1": rng.normal(size=(n, 4)).astype(np.float32),
                "labels": rng.random((n, 3)) < 0.5, "index": np.arange(first, first + n),
                "class_names": np.array(["x", "y", "z"])}

    q, a = arrays(12, 0), arrays(50, 0)
    np.savez(tmp_path / "q.npz", **q)
    np.savez(tmp_path / "a.npz", **a)
    out = tmp_path / "ret"
    retrieval.main(["--query_npz", str(tmp_path / "q.npz"), "--archive_npz",
                    str(tmp_path / "a.npz"), "--output", str(out), "--ks", "5", "20",
                    "--archive_block", "16"])
    result = json.loads((out / "retrieval.json").read_text())
    assert list(result["modes"]) == ["fused", "s1"] and result["skipped_modes"] == [
        "s2", "s1_to_s2", "s2_to_s1"]
    ref = retrieval.evaluate(q, a, modes=["fused", "s1"], ks=[5, 20])
    assert result["modes"]["fused"]["overall"] == pytest.approx(ref["modes"]["fused"]["overall"])
    assert result["class_names"] == ["x", "y", "z"] and not result["exclude_self"]
    md = (out / "retrieval.md").read_text()
    assert "| fused | " in md and "## Per class, mode s1 (h_s1 -> h_s1)" in md
    assert "Skipped modes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        retrieval.main(["--query_npz", str(tmp_path / "q.npz"), "--archive_npz",
                        str(tmp_path / "a.npz"), "--output", str(out), "--modes", "s2"])
    assert "'h_s2'" in capsys.readouterr().err
    # The same file as query and archive: each query is left out of its own results.
    retrieval.main(["--query_npz", str(tmp_path / "a.npz"), "--archive_npz",
                    str(tmp_path / "a.npz"), "--output", str(out), "--ks", "5"])
    assert json.loads((out / "retrieval.json").read_text())["exclude_self"]


@pytest.mark.slow
def test_benchmark_quick_run_prints_the_table_and_writes_json(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "retrieval.json"
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.retrieval", "--quick", "--output",
                           str(out)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| queries x archive " in proc.stdout and "| 200 x 3,000 " in proc.stdout
    data = json.loads(out.read_text())
    result = data["result"]
    assert data["benchmark"] == "retrieval" and data["quick"] is True
    assert (result["queries"], result["archive"], result["k"]) == (200, 3000, 100)
    assert result["peak_rss_bytes"] >= result["rss_after_inputs_bytes"] > 0
    # Random embeddings, random labels of density 0.15: precision is near chance.
    assert 0.0 < result["map_at_10_random"] < 1.0


def _one_error_line(capsys, argv):
    """(exit status, the one `error:` line) of `retrieval.main(argv)`; fails on a traceback."""
    with pytest.raises(SystemExit) as info:
        retrieval.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return info.value.code, lines[0]


def test_command_line_bad_files_end_in_one_line(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(6)
    arrays = {"embedding": rng.normal(size=(10, 4)).astype(np.float32),
              "labels": rng.random((10, 3)) < 0.5, "index": np.arange(10)}
    good = tmp_path / "a.npz"
    np.savez(good, **arrays)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    out = str(tmp_path / "ret")
    args = ["--archive_npz", str(good), "--output", out]
    status, line = _one_error_line(capsys, ["--query_npz", str(truncated), *args])
    assert status == 1 and line.startswith(f"error: {truncated} is not a readable .npz file")
    status, line = _one_error_line(capsys, ["--query_npz", str(tmp_path), *args])
    assert status == 1 and line == f"error: --query_npz {tmp_path} is a folder; give a file"
    # An output that is a file is refused before any work.
    status, line = _one_error_line(capsys, ["--query_npz", str(good), "--archive_npz",
                                            str(good), "--output", str(good)])
    assert status == 1 and line == f"error: --output {good} is an existing file; give a folder"
    # Ctrl-C: one line, status 130; --verbose is accepted (and prints the traceback first).
    monkeypatch.setattr(retrieval, "evaluate", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    status, line = _one_error_line(capsys, ["--query_npz", str(good), *args, "--verbose"])
    assert (status, line) == (130, "error: interrupted")
    assert not os.path.exists(out)


def _embeddings(rng, n, d=6, c=4, first=0):
    return {"embedding": rng.normal(size=(n, d)).astype(np.float32),
            "labels": rng.random((n, c)) < 0.4, "index": np.arange(first, first + n)}


def test_non_finite_embeddings_are_left_out_and_counted():
    rng = np.random.default_rng(11)
    q, a = _embeddings(rng, 20), _embeddings(rng, 60)
    bad_q, bad_a = [2, 7, 11], [0, 5, 33, 59]
    q_nan, a_nan = dict(q), dict(a)
    q_nan["embedding"] = q["embedding"].copy()
    a_nan["embedding"] = a["embedding"].copy()
    q_nan["embedding"][bad_q, 1] = np.nan
    a_nan["embedding"][bad_a[:2], 0] = np.nan
    a_nan["embedding"][bad_a[2:], 3] = np.inf
    got = retrieval.evaluate(q_nan, a_nan, modes=["fused"], ks=[1, 10])["modes"]["fused"]
    keep_q, keep_a = np.delete(np.arange(20), bad_q), np.delete(np.arange(60), bad_a)
    ref = retrieval.evaluate({k: v[keep_q] for k, v in q.items()},
                             {k: v[keep_a] for k, v in a.items()}, modes=["fused"],
                             ks=[1, 10])["modes"]["fused"]
    assert got["overall"] == pytest.approx(ref["overall"])
    assert got["num_queries"] == 17 and got["num_queries_non_finite"] == 3
    assert got["num_archive_non_finite"] == 4
    result = {"modes": {"fused": got}, "num_archive": 60}
    assert retrieval.non_finite_lines(result) == [
        "Mode fused: left out 3 of 20 queries and 4 of 60 archive patches whose embeddings "
        "(embedding, embedding) are not finite (NaN or inf)."]
    # With the same set as query and archive, each query still skips itself (positions shift
    # when archive rows are left out).
    same = retrieval.evaluate(a_nan, a_nan, modes=["fused"], ks=[1], exclude_self=True)
    ref_same = retrieval.evaluate({k: v[keep_a] for k, v in a.items()},
                                  {k: v[keep_a] for k, v in a.items()}, modes=["fused"],
                                  ks=[1], exclude_self=True)
    assert same["modes"]["fused"]["overall"] == pytest.approx(
        ref_same["modes"]["fused"]["overall"])
    all_bad = dict(q_nan, embedding=np.full((20, 6), np.nan, np.float32))
    with pytest.raises(ValueError, match="no query embedding .* is finite"):
        retrieval.evaluate(all_bad, a, modes=["fused"], ks=[1])


def test_command_line_reports_non_finite_rows(tmp_path, capsys):
    rng = np.random.default_rng(12)
    q, a = _embeddings(rng, 10), _embeddings(rng, 30)
    q["embedding"][:3] = np.nan
    np.savez(tmp_path / "q.npz", **q)
    np.savez(tmp_path / "a.npz", **a)
    retrieval.main(["--query_npz", str(tmp_path / "q.npz"), "--archive_npz",
                    str(tmp_path / "a.npz"), "--output", str(tmp_path / "out"), "--ks", "5"])
    out = capsys.readouterr().out
    assert "warning: Mode fused: left out 3 of 10 queries and 0 of 30 archive patches" in out
    md = (tmp_path / "out" / "retrieval.md").read_text()
    assert "left out 3 of 10 queries" in md and "| fused | " in md


def test_an_empty_query_file_is_a_clear_error(tmp_path, capsys):
    rng = np.random.default_rng(13)
    a = _embeddings(rng, 30)
    np.savez(tmp_path / "a.npz", **a)
    np.savez(tmp_path / "q.npz", **{k: v[:0] for k, v in a.items()})
    with pytest.raises(SystemExit) as e:
        retrieval.main(["--query_npz", str(tmp_path / "q.npz"), "--archive_npz",
                        str(tmp_path / "a.npz"), "--output", str(tmp_path / "out")])
    assert e.value.code == 1
    assert f"{tmp_path / 'q.npz'} holds no patch (0 rows)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no queries"):
        retrieval.top_k_similar(np.zeros((0, 3)), np.ones((4, 3)), 1)


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_the_same_set_under_another_path_excludes_self(tmp_path, how):
    rng = np.random.default_rng(14)
    a = _embeddings(rng, 40)
    a["patch_id"] = np.array([f"p{i}" for i in range(40)])
    np.savez(tmp_path / "a.npz", **a)
    other = tmp_path / "other.npz"
    if how == "copy":
        other.write_bytes((tmp_path / "a.npz").read_bytes())
    else:
        other.symlink_to(tmp_path / "a.npz")
    retrieval.main(["--query_npz", str(other), "--archive_npz", str(tmp_path / "a.npz"),
                    "--output", str(tmp_path / "out"), "--ks", "1"])
    result = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert result["exclude_self"]
    # A query retrieving itself would make precision@1 exactly 1.
    assert result["modes"]["fused"]["overall"]["precision@1"] < 1.0


def test_same_content_compares_ids_or_arrays():
    rng = np.random.default_rng(15)
    a, b = _embeddings(rng, 8), _embeddings(rng, 8)
    assert retrieval.same_content(a, {k: v.copy() for k, v in a.items()})
    assert not retrieval.same_content(a, b)
    ids = {"patch_id": np.array(["x", "y"])}
    assert retrieval.same_content({**a, **ids}, {**b, **ids})  # ids decide when both have them
    assert not retrieval.same_content({**a, **ids}, {**a, "patch_id": np.array(["x", "z"])})


@pytest.mark.parametrize("same_split", [False, True])
@pytest.mark.parametrize("c", [5, 23])  # the subset-sum table, and the blocked overlap test
def test_chance_precision_is_the_relevant_share_of_the_archive(same_split, c):
    rng = np.random.default_rng(16)
    a = _embeddings(rng, 50, c=c)
    q = a if same_split else _embeddings(rng, 15, c=c)
    q["labels"][0] = False  # a query without labels is left out of the mean
    result = retrieval.evaluate(q, a, modes=["fused"], ks=[5], exclude_self=same_split)
    yq, ya = q["labels"], a["labels"]
    shares = []
    for i in range(len(yq)):
        if not yq[i].any():
            continue
        others = [j for j in range(len(ya)) if not (same_split and j == i)]
        shares.append(np.mean([(yq[i] & ya[j]).any() for j in others]))
    overall = result["modes"]["fused"]["overall"]
    assert overall["chance_precision"] == pytest.approx(np.mean(shares))
    c0 = [s for s, i in zip(shares, [i for i in range(len(yq)) if yq[i].any()], strict=True)
          if yq[i, 0]]
    assert result["modes"]["fused"]["per_class"]["class 0"]["chance_precision"] == \
        pytest.approx(np.mean(c0))
    md = retrieval.results_markdown(result)
    assert "| mode | queries | precision@5 | map@5 | ndcg@5 | chance_precision |" in md
    table_md, table_csv = retrieval.report_table([("m", "d", result)])
    assert table_md.splitlines()[0].endswith("| chance_precision |")
    assert table_csv.splitlines()[0].endswith(",chance_precision")


def test_modes_left_out_by_choice_are_not_called_missing(tmp_path, capsys):
    rng = np.random.default_rng(17)
    data = {**_embeddings(rng, 20), "h_s1": rng.normal(size=(20, 3)).astype(np.float32)}
    np.savez(tmp_path / "a.npz", **data)
    retrieval.main(["--query_npz", str(tmp_path / "a.npz"), "--archive_npz",
                    str(tmp_path / "a.npz"), "--output", str(tmp_path / "out"), "--ks", "3",
                    "--modes", "fused"])
    assert "Skipped modes (outputs missing): s2, s1_to_s2, s2_to_s1" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert list(result["modes"]) == ["fused"]
    assert result["skipped_modes"] == ["s2", "s1_to_s2", "s2_to_s1"]
