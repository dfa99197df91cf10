"""Scene mapping: the pure window/blend/nodata core against brute-force references, and
`predict_scene` against the exported embedder applied to the scene's patches directly."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE
from test_remote_paths import BUCKET, bucket  # noqa: F401  (the fake gs:// fixture)

from mosaic_jax import export
from mosaic_jax.data import bands
from mosaic_jax.export import exporter
from mosaic_jax.inference import predict, scene_windows

rasterio = pytest.importorskip("rasterio")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.predict_scene import model_config, untrained_export, untrained_workdir  # noqa: E402
from data_builders.fake_scene import write_fake_scene  # noqa: E402

DATASET = "bigearthnet_v2"


# ----------------------------------------------------------------------------------------------
# The pure core


@pytest.mark.parametrize("length,size,stride,want", [
    (240, 120, 60, [0, 60, 120]),
    (250, 120, 60, [0, 60, 120, 130]),
    (250, 120, 120, [0, 120, 130]),
    (120, 120, 7, [0]),
    (121, 120, 120, [0, 1]),
])
def test_window_offsets_cover_the_scene_and_end_at_its_edge(length, size, stride, want):
    offsets = scene_windows.window_offsets(length, size, stride)
    assert offsets.tolist() == want
    covered = np.zeros(length, bool)
    for o in offsets:
        covered[o:o + size] = True
    assert covered.all() and offsets[-1] + size == length


def test_window_geometry_errors_name_the_problem():
    with pytest.raises(ValueError, match="stride must be between 1 and the patch size 120"):
        scene_windows.window_offsets(500, 120, 121)
    with pytest.raises(ValueError, match=r"smaller than the model's patch size \(120 px\)"):
        scene_windows.window_offsets(100, 120, 60)


@pytest.mark.parametrize("length,size,stride", [(250, 120, 60), (370, 120, 120), (300, 120, 50),
                                                (121, 120, 1)])
def test_covered_cells_match_the_cell_centre_rule(length, size, stride):
    offsets = scene_windows.window_offsets(length, size, stride)
    lo, hi = scene_windows.covered_cells(offsets, size, length, stride)
    n = scene_windows.output_length(length, stride)
    assert n == int(np.ceil(length / stride))
    seen = np.zeros(n, int)
    for o, a, b in zip(offsets, lo, hi, strict=True):
        for cell in range(n):  # float centre of the part of the cell inside the scene
            centre = (cell * stride + min((cell + 1) * stride, length)) / 2
            assert (a <= cell < b) == (o <= centre < o + size), (o, cell)
        seen[a:b] += 1
    assert (seen > 0).all()  # every cell has a window


def test_accumulate_and_blend_equal_a_per_cell_mean():
    rng = np.random.default_rng(0)
    h, w, size, stride, c = 250, 370, 120, 60, 3
    rows = scene_windows.window_offsets(h, size, stride)
    cols = scene_windows.window_offsets(w, size, stride)
    rlo, rhi = scene_windows.covered_cells(rows, size, h, stride)
    clo, chi = scene_windows.covered_cells(cols, size, w, stride)
    grid = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    probs = rng.uniform(size=(len(grid), c))
    keep = rng.uniform(size=len(grid)) > 0.3  # skipped windows
    oh, ow = scene_windows.output_length(h, stride), scene_windows.output_length(w, stride)
    sums, counts = np.zeros((oh, ow, c)), np.zeros((oh, ow), np.int64)
    idx = np.flatnonzero(keep)
    i, j = np.array([grid[k][0] for k in idx]), np.array([grid[k][1] for k in idx])
    scene_windows.accumulate(sums, counts, probs[idx], (rlo[i], rhi[i]), (clo[j], chi[j]))
    got = scene_windows.blend(sums, counts)
    for y in range(oh):
        for x in range(ow):
            hits = [probs[k] for k, (a, b) in enumerate(grid) if keep[k]
                    and rlo[a] <= y < rhi[a] and clo[b] <= x < chi[b]]
            if hits:
                np.testing.assert_allclose(got[y, x], np.mean(hits, axis=0), rtol=1e-6)
            else:
                assert np.isnan(got[y, x]).all()
    with pytest.raises(ValueError, match="fall outside the accumulated rows"):
        scene_windows.accumulate(sums[:1], counts[:1], probs[:1], (rlo[2:3], rhi[2:3]),
                                 (clo[:1], chi[:1]))


def test_valid_pixels_and_window_fractions():
    s1 = np.full((4, 6, 2), -12.0, np.float32)
    s2 = np.full((4, 6, 3), 500, np.uint16)
    s1[0, 0, 1] = np.nan          # NaN in one band
    s2[1, 1] = 0                  # S2 all-zero fill
    s2[2, 2, 0] = 0               # one zero band: still valid
    s1[3, 3] = -99.0              # S1 nodata value in every band
    s1[3, 4, 0] = -99.0           # in one band only: valid
    valid = scene_windows.valid_pixels(s1, s2, s1_nodata=-99.0, s2_nodata=0)
    want = np.ones((4, 6), bool)
    want[0, 0] = want[1, 1] = want[3, 3] = False
    np.testing.assert_array_equal(valid, want)
    fractions = scene_windows.window_valid_fractions(valid, np.array([0, 1, 2]), 4)
    np.testing.assert_allclose(fractions, [valid[:, o:o + 4].mean() for o in (0, 1, 2)])


def test_normalise_matches_the_training_pipeline():
    rng = np.random.default_rng(1)
    s2 = rng.integers(1, 9000, size=(5, 7, 12)).astype(np.uint16)
    names = bands.resolve_bands("s2_10", DATASET, "s2")
    idx = [bands.stored_bands(DATASET, "s2").index(b) for b in names]
    mean, std = bands.band_stats(DATASET, "s2", names)
    np.testing.assert_array_equal(scene_windows.normalise(s2[..., idx], mean, std),
                                  bands.normalize(s2, DATASET, "s2", names))
    s1 = rng.uniform(-40, 5, size=(5, 7, 2)).astype(np.float32)
    got = scene_windows.normalise(s1, [-11.0, -18.0], [4.0, 4.0], (-25.0, 0.0))
    np.testing.assert_allclose(got, (np.clip(s1, -25, 0) - [-11.0, -18.0]) / 4.0, rtol=1e-6)


def test_multi_hot_marks_nodata():
    p = np.array([[0.2, 0.5, np.nan]], np.float32)
    np.testing.assert_array_equal(scene_windows.multi_hot(p, 0.5), [[0, 1, 255]])


def test_band_indexes_by_name_or_by_count():
    want = ["B02", "B03", "B8A"]
    stored = ["B01", "B02", "B03", "B04", "B8A"]
    assert predict.band_indexes(stored, 5, want, "a.tif", "s2") == [2, 3, 5]
    assert predict.band_indexes([None] * 3, 3, want, "a.tif", "s2") == [1, 2, 3]
    with pytest.raises(ValueError, match=r"s2 file a\.tif: .* do not name .*'B8A'"):
        predict.band_indexes(["B01", "B02", "B03"], 3, want, "a.tif", "s2")
    with pytest.raises(ValueError, match=r"s2 file b\.tif has 5 band\(s\) without descriptions; "
                                         r"the model needs 3"):
        predict.band_indexes([None] * 5, 5, want, "b.tif", "s2")


def test_s1_units_and_db_conversion():
    rng = np.random.default_rng(2)
    db = rng.normal(-14, 5, size=(2, 50, 50)).astype(np.float32)
    assert predict.s1_units(db)[0] == "dB"
    linear = (10 ** (db / 10)).astype(np.float32)
    linear[0, 0, 0] = np.nan
    units, share = predict.s1_units(linear)
    assert units == "linear" and share == 1.0
    back = predict.to_db(np.array([1.0, 0.01, 0.0, -1.0], np.float32))
    np.testing.assert_allclose(back[:2], [0.0, -20.0], atol=1e-6)
    assert np.isnan(back[2:]).all()
    assert predict.gdal_path("gs://b/k/s2.tif") == "/vsigs/b/k/s2.tif"


# ----------------------------------------------------------------------------------------------
# predict_scene with a tiny export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(export dir, model.json) of an untrained test-size MoSAiC-1 (120 px patches)."""
    root = tmp_path_factory.mktemp("predict_export")
    info = untrained_export(model_config("tiny"), root / "run", root / "export")
    return str(root / "export"), info


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """name -> (s1, s2) paths of fake scenes: an exact 2 x 3 patch grid, one with cut edges,
    one with a no-data edge."""
    root = tmp_path_factory.mktemp("scenes")
    out = {}
    for name, h, w, edge in (("grid", 240, 360, 0), ("edges", 250, 370, 0),
                             ("nodata", 240, 360, 100)):
        s1, s2 = str(root / f"{name}_s1.tif"), str(root / f"{name}_s2.tif")
        write_fake_scene(s1, s2, height=h, width=w, seed=3, nodata_edge=edge)
        out[name] = (s1, s2)
    return out


def _read(path):
    with rasterio.open(path) as src:
        return np.moveaxis(src.read(), 0, -1), src.transform, src.crs


def _reference_window_probs(export_dir, info, s1_path, s2_path, offsets):
    """The embedder's probabilities of the windows at `offsets` [(row, col)], normalised with
    the training pipeline's `bands.normalize`; invalid pixels (NaN, S2 all zero) set to the band
    mean (0)."""
    size = info["input_size"]
    x1, _, _ = _read(s1_path)
    x2, _, _ = _read(s2_path)
    invalid = np.isnan(x1).any(-1) | (x2 == 0).all(-1)
    n1 = bands.normalize(x1, DATASET, "s1", info["inputs"]["s1"]["bands"])
    n2 = bands.normalize(x2, DATASET, "s2", info["inputs"]["s2"]["bands"])
    n1[invalid] = 0
    n2[invalid] = 0
    w1 = np.stack([n1[r:r + size, c:c + size] for r, c in offsets])
    w2 = np.stack([n2[r:r + size, c:c + size] for r, c in offsets])
    return np.asarray(export.load_embedder(export_dir)(w1, w2)["probs"])


def test_stride_equal_to_patch_size_gives_each_patch_its_probabilities(tiny, scenes, tmp_path):
    export_dir, info = tiny
    s1, s2 = scenes["grid"]
    out = str(tmp_path / "maps" / "area.tif")
    summary = predict.predict_scene(export_dir, s1, s2, out, stride=120, batch_size=4,
                                    labels_threshold=0.5, progress=False)
    assert summary["windows"] == summary["windows_run"] == 6 and summary["map_px"] == [2, 3]
    got, transform, crs = _read(out)
    offsets = [(r, c) for r in (0, 120) for c in (0, 120, 240)]
    ref = _reference_window_probs(export_dir, info, s1, s2, offsets)
    np.testing.assert_allclose(got.reshape(6, -1), ref, atol=1e-6, rtol=0)
    assert np.std(ref) > 1e-4  # the windows differ, so a mix-up would show

    _, in_transform, in_crs = _read(s2)
    assert crs == in_crs
    assert transform == in_transform @ in_transform.scale(120, 120)
    with rasterio.open(out) as src:
        assert src.descriptions == tuple(info["class_names"])
        assert np.isnan(src.nodata) and src.dtypes[0] == "float32"
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["tiled"] and src.compression.name.lower() == "deflate"
    labels, t2, _ = _read(str(tmp_path / "maps" / "area_labels.tif"))
    np.testing.assert_array_equal(labels, (got >= 0.5).astype(np.uint8))
    assert t2 == transform
    with open(tmp_path / "maps" / "area.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "maps")) == ["area.png", "area.tif", "area_labels.tif"]


def test_overlapping_and_edge_windows_are_blended(tiny, scenes, tmp_path):
    export_dir, info = tiny
    s1, s2 = scenes["edges"]  # 250 x 370: edge windows at row 130 and column 250
    out = str(tmp_path / "edges.tif")
    summary = predict.predict_scene(export_dir, s1, s2, out, stride=60, batch_size=5,
                                    quicklook=False, progress=False)
    rows, cols = [0, 60, 120, 130], [0, 60, 120, 180, 240, 250]
    offsets = [(r, c) for r in rows for c in cols]
    assert summary["windows_run"] == len(offsets) and summary["map_px"] == [5, 7]
    ref = _reference_window_probs(export_dir, info, s1, s2, offsets).reshape(4, 6, -1)
    got, _, _ = _read(out)

    def centre(cell, length):
        return (cell * 60 + min((cell + 1) * 60, length)) / 2

    for y in range(5):
        for x in range(7):
            hits = [ref[i, j] for i, r in enumerate(rows) for j, c in enumerate(cols)
                    if r <= centre(y, 250) < r + 120 and c <= centre(x, 370) < c + 120]
            np.testing.assert_allclose(got[y, x], np.mean(hits, axis=0), atol=1e-6, rtol=0)
    assert not os.path.exists(tmp_path / "edges.png")


def test_windows_without_enough_data_give_nodata(tiny, scenes, tmp_path):
    export_dir, info = tiny
    s1, s2 = scenes["nodata"]  # columns 260..359 blank (S2 0, S1 NaN)
    out = str(tmp_path / "nd.tif")
    summary = predict.predict_scene(export_dir, s1, s2, out, stride=60, batch_size=8,
                                    labels_threshold=0.4, progress=False)
    # Column windows 0..240 step 60: 240 has 20/120 valid columns (< 0.5), 180 has 80/120.
    assert summary["windows_skipped"] == 3
    got, _, _ = _read(out)
    assert np.isnan(got[:, 5]).all() and np.isfinite(got[:, :5]).all()
    # Cell column 4 (centre x = 270) is seen only by the window at column 180, which has
    # 40 blank columns: fed as the band mean.
    ref = _reference_window_probs(export_dir, info, s1, s2, [(0, 180)])
    np.testing.assert_allclose(got[0, 4], ref[0], atol=1e-6, rtol=0)
    labels, _, _ = _read(str(tmp_path / "nd_labels.tif"))
    assert (labels[:, 5] == 255).all() and set(np.unique(labels[:, :5])) <= {0, 1}

    lenient = str(tmp_path / "lenient.tif")
    predict.predict_scene(export_dir, s1, s2, lenient, stride=60, min_valid=0.1,
                          quicklook=False, progress=False)
    assert np.isfinite(_read(lenient)[0]).all()


def _write_like(path, data, src_path, **changes):
    with rasterio.open(src_path) as src:
        profile = {**src.profile, **changes}
        descriptions = src.descriptions
    profile.update(count=data.shape[-1], dtype=data.dtype.name)
    with rasterio.open(path, "w", **profile) as dst:
        dst.descriptions = descriptions
        dst.write(np.moveaxis(data, -1, 0))


def test_s1_on_another_grid_is_resampled_or_refused(tiny, scenes, tmp_path):
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    x1, transform, _ = _read(s1)
    # A larger S1 raster, 3 px further up and left: the S2 grid's pixels are among its own.
    big = np.pad(x1, ((3, 5), (3, 4), (0, 0)), mode="reflect")
    moved = str(tmp_path / "s1_big.tif")
    _write_like(moved, big, s1, height=big.shape[0], width=big.shape[1],
                transform=transform @ transform.translation(-3, -3))
    messages = []
    out = str(tmp_path / "resampled.tif")
    summary = predict.predict_scene(export_dir, moved, s2, out, stride=120, quicklook=False,
                                    progress=False, log=messages.append)
    assert summary["s1_resampled"]
    assert len(messages) == 1 and moved in messages[0] and s2 in messages[0]
    aligned = str(tmp_path / "aligned.tif")
    predict.predict_scene(export_dir, s1, s2, aligned, stride=120, quicklook=False,
                          progress=False)
    np.testing.assert_allclose(_read(out)[0], _read(aligned)[0], atol=1e-5)
    with pytest.raises(ValueError, match=re.escape(moved) + ".*" + re.escape(s2)):
        predict.predict_scene(export_dir, moved, s2, str(tmp_path / "no.tif"), stride=120,
                              grid_mismatch="error", progress=False)
    assert not os.path.exists(tmp_path / "no.tif")


def test_linear_s1_is_refused_or_converted(tiny, scenes, tmp_path):
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    linear = str(tmp_path / "s1_linear.tif")
    _write_like(linear, (10 ** (_read(s1)[0] / 10)).astype(np.float32), s1)
    with pytest.raises(ValueError, match=re.escape(linear) + ".*linear power.*--s1_linear"):
        predict.predict_scene(export_dir, linear, s2, str(tmp_path / "x.tif"), progress=False)
    with pytest.raises(ValueError, match="looks like dB already"):
        predict.predict_scene(export_dir, s1, s2, str(tmp_path / "x.tif"), s1_linear=True,
                              progress=False)
    out, ref = str(tmp_path / "lin.tif"), str(tmp_path / "db.tif")
    predict.predict_scene(export_dir, linear, s2, out, stride=120, s1_linear=True,
                          quicklook=False, progress=False)
    predict.predict_scene(export_dir, s1, s2, ref, stride=120, quicklook=False, progress=False)
    np.testing.assert_allclose(_read(out)[0], _read(ref)[0], atol=1e-5)


def test_bad_inputs_are_refused_with_the_file_named(tiny, scenes, tmp_path):
    export_dir, info = tiny
    s1, s2 = scenes["grid"]
    x2 = _read(s2)[0]
    nameless = str(tmp_path / "s2_nameless.tif")
    _write_like(nameless, x2, s2)
    with rasterio.open(nameless, "r+") as dst:
        dst.descriptions = (None,) * dst.count
    with pytest.raises(ValueError, match=re.escape(nameless) + r" has 12 band\(s\) without "):
        predict.predict_scene(export_dir, s1, nameless, str(tmp_path / "x.tif"), progress=False)
    with pytest.raises(ValueError, match="--stride must be between 1 and the model's patch"):
        predict.predict_scene(export_dir, s1, s2, str(tmp_path / "x.tif"), stride=121)
    with pytest.raises(ValueError, match="'Lava' is not a class of the export"):
        predict.predict_scene(export_dir, s1, s2, str(tmp_path / "x.tif"),
                              quicklook_classes=["Lava"])



def test_a_diverged_export_is_refused(tmp_path, scenes, monkeypatch):
    # An export of non-finite parameters (exported before export refused them) maps nothing.
    from mosaic_jax.training import checkpoints, train

    config = model_config("tiny")
    state = train.random_state(config, step=1)
    params = jax.tree.map(np.array, state.params)  # writable copies
    params["classifier"]["bias"][0] = np.nan
    workdir = checkpoints.write_workdir(tmp_path / "run", config, state.replace(params=params))
    monkeypatch.setattr(checkpoints, "require_finite", lambda run: None)
    exporter.export_workdir(workdir, str(tmp_path / "broken"), platforms=("cpu",))
    s1, s2 = scenes["grid"]
    with pytest.raises(ValueError, match="non-finite probs .*diverged"):
        predict.predict_scene(str(tmp_path / "broken"), s1, s2, str(tmp_path / "x.tif"),
                              progress=False)
    assert not os.path.exists(tmp_path / "x.tif")


def test_output_to_a_bucket(tiny, scenes, bucket):  # noqa: F811
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    summary = predict.predict_scene(export_dir, s1, s2, f"{BUCKET}/maps/area.tif", stride=120,
                                    labels_threshold=0.5, progress=False)
    assert summary["labels"] == f"{BUCKET}/maps/area_labels.tif"
    assert sorted(os.listdir(os.path.join(bucket, "maps"))) == [
        "area.png", "area.tif", "area_labels.tif"]
    got, transform, _ = _read(os.path.join(bucket, "maps", "area.tif"))
    assert got.shape[:2] == (2, 3) and np.isfinite(got).all()


@pytest.mark.slow
def test_readme_map_a_scene_commands_run_as_written(tmp_path):
    """README's "Map a scene" block, on a random-weight demo-size workdir in place of the demo
    run (same config, no training)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Map a scene", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [c for c in block.replace("\\\n", " ").splitlines()
                if c.strip() and not c.startswith("#")]
    assert any("mosaic_jax predict" in c for c in commands)
    untrained_workdir(model_config("demo"), tmp_path / "runs" / "demo")
    # `python` in the commands is this interpreter, as in the environment README sets up.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE,
               PATH=path)
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    maps = sorted(os.listdir(tmp_path / "maps"))
    assert "area.tif" in maps and "area.png" in maps
    with rasterio.open(tmp_path / "maps" / "area.tif") as src:
        assert src.count == 19 and np.isfinite(src.read(1)).any()


@pytest.mark.slow
def test_benchmark_quick_run_reports_every_workload(tmp_path):
    out = tmp_path / "predict_scene.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE)
    result = subprocess.run([sys.executable, "-m", "benchmarks.predict_scene", "--quick",
                             "--work_dir", str(tmp_path / "work"), "--output", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert [r["workload"] for r in payload["results"]] == ["resnet50_sub", "demo_full",
                                                           "demo_sub"]
    for r in payload["results"]:
        assert r["windows_run"] == r["windows"] > 0 and r["windows_per_s"] > 0
        assert 0 < r["peak_rss_gib"] < 64 and 0 <= r["host_share"] <= 1
    assert "| demo_full" in result.stdout and "peak RSS GiB" in result.stdout
