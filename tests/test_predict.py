"""Scene mapping: the pure window/blend/nodata core against brute-force references, and
`predict_scene` against the exported embedder applied to the scene's patches directly."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
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
from mosaic_jax.inference import (
    input_units,
    map_accuracy,
    map_writer,
    predict,
    quicklook,
    scene_reader,
    scene_windows,
)

rasterio = pytest.importorskip("rasterio")

REPO = pathlib.Path(__file__).resolve().parents[1]

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


def _windows_and_cells(h, w, size, stride):
    """Window offsets along rows and columns and the output cells each window covers."""
    rows = scene_windows.window_offsets(h, size, stride)
    cols = scene_windows.window_offsets(w, size, stride)
    return (rows, cols, scene_windows.covered_cells(rows, size, h, stride),
            scene_windows.covered_cells(cols, size, w, stride))


def test_accumulate_and_blend_equal_a_per_cell_mean():
    rng = np.random.default_rng(0)
    h, w, size, stride, c = 250, 370, 120, 60, 3
    rows, cols, (rlo, rhi), (clo, chi) = _windows_and_cells(h, w, size, stride)
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
    assert input_units.s1_units(db)[0] == "dB"
    linear = (10 ** (db / 10)).astype(np.float32)
    linear[0, 0, 0] = np.nan
    units, share = input_units.s1_units(linear)
    assert units == "linear" and share == 1.0
    back = input_units.to_db(np.array([1.0, 0.01, 0.0, -1.0], np.float32))
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
    """README's "Map a scene" block, after the quick start's one export of the demo, on a
    random-weight demo-size workdir in place of the demo run (same config, no training)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Map a scene", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    export = re.search(r"^python -m mosaic_jax export --workdir runs/demo --output (\S+)$",
                       text.split("## Quick start", 1)[1].split("\n## ", 1)[0], flags=re.M)
    assert export and f"--export {export.group(1)} " in block  # the section reuses it
    commands = [export.group(0)] + [c for c in block.replace("\\\n", " ").splitlines()
                                    if c.strip() and not c.startswith("#")]
    assert any("mosaic_jax predict" in c and "--reference" in c for c in commands)
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


# ----------------------------------------------------------------------------------------------
# The command line: one `error:` line for every bad input, checked before the work


def _main_error(capsys, argv):
    """(exit status, the one `error:` line) of `predict.main(argv)`; fails on a traceback."""
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return info.value.code, lines[0]


def test_command_line_bad_inputs_end_in_one_line(tiny, scenes, tmp_path, capsys):
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    out = str(tmp_path / "maps" / "area.tif")

    def run(*, export=export_dir, s1=s1, s2=s2, output=out, extra=()):
        return _main_error(capsys, ["--export", export, "--s1", s1, "--s2", s2, "--output",
                                    output, "--no_progress", *extra])

    data = pathlib.Path(s1).read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[:len(data) // 2])
    header_only = tmp_path / "header_only.tif"
    header_only.write_bytes(data[:300])
    text = tmp_path / "notes.tif"
    text.write_text("not a GeoTIFF\n")
    (tmp_path / "empty.tif").write_bytes(b"")
    for bad, want in ((str(truncated), f"--s1 {truncated} cannot be read as a GeoTIFF"),
                      (str(header_only), f"--s1 {header_only} "),
                      (str(text), f"--s1 {text} cannot be read as a GeoTIFF"),
                      (str(tmp_path / "empty.tif"), "is empty (0 bytes)"),
                      (str(tmp_path), f"--s1 {tmp_path} is a folder"),
                      (str(tmp_path / "nope.tif"), f"--s1 {tmp_path / 'nope.tif'} does not "
                                                   "exist")):
        status, line = run(s1=bad)
        assert status == 1 and want in line, line
    status, line = run(s2="gs://no-such-bucket-of-mosaic/s2.tif")
    assert status == 1 and line.startswith("error: --s2 gs://no-such-bucket-of-mosaic/s2.tif "
                                           "cannot be read as a GeoTIFF"), line
    # An output that is a folder is refused before the scene is mapped (nothing written).
    (tmp_path / "maps").mkdir()
    status, line = run(output=str(tmp_path / "maps"))
    assert status == 1 and line == f"error: --output {tmp_path / 'maps'} is an existing folder; " \
                                   "give a file path"
    assert os.listdir(tmp_path / "maps") == []
    # A model.json without a key, a truncated embedder: the file is named.
    import shutil

    broken = tmp_path / "broken_export"
    shutil.copytree(export_dir, broken)
    info = json.loads((broken / export.MODEL_FILE).read_text())
    del info["class_names"]
    (broken / export.MODEL_FILE).write_text(json.dumps(info))
    status, line = run(export=str(broken))
    assert status == 1 and f"{broken / export.MODEL_FILE} lacks class_names" in line
    shutil.copy(os.path.join(export_dir, export.MODEL_FILE), broken / export.MODEL_FILE)
    data = (broken / export.EMBEDDER_FILE).read_bytes()
    (broken / export.EMBEDDER_FILE).write_bytes(data[:len(data) // 2])
    status, line = run(export=str(broken))
    assert status == 1 and f"{broken / export.EMBEDDER_FILE} ({len(data) // 2} bytes) is not " \
                           "a readable jax.export embedder" in line
    # --verbose: the traceback, then the same one line.
    with pytest.raises(SystemExit):
        predict.main(["--export", export_dir, "--s1", str(text), "--s2", s2, "--output", out,
                      "--verbose"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith(f"error: --s1 {text} cannot be read")


def test_quicklook_classes_keep_their_commas(tiny, scenes, tmp_path, capsys, monkeypatch):
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    out = str(tmp_path / "area.tif")
    predict.main(["--export", export_dir, "--s1", s1, "--s2", s2, "--output", out,
                  "--stride", "120", "--no_progress",
                  "--quicklook_class", "Beaches, dunes, sands",
                  "--quicklook_class", "Urban fabric"])
    assert "quicklook: " in capsys.readouterr().out and os.path.isfile(tmp_path / "area.png")
    seen = {}
    monkeypatch.setattr(predict, "predict_scene",
                        lambda *a, **kw: seen.update(kw) or (_ for _ in ()).throw(
                            ValueError("stop")))
    with pytest.raises(SystemExit):
        predict.main(["--export", export_dir, "--s1", s1, "--s2", s2, "--output", out,
                      "--quicklook_class", "Beaches, dunes, sands",
                      "--quicklook_class", "Urban fabric"])
    assert seen["quicklook_classes"] == ["Beaches, dunes, sands", "Urban fabric"]


# ----------------------------------------------------------------------------------------------
# The three units of predict_scene, each driven alone


def test_row_accumulator_pops_the_blend_of_all_windows_row_by_row():
    rng = np.random.default_rng(4)
    h, w, size, stride, c = 370, 250, 120, 50, 3
    rows, cols, (rlo, rhi), (clo, chi) = _windows_and_cells(h, w, size, stride)
    oh, ow = scene_windows.output_length(h, stride), scene_windows.output_length(w, stride)
    probs = rng.uniform(size=(len(rows), len(cols), c))
    keep = rng.uniform(size=(len(rows), len(cols))) > 0.4
    sums, counts = np.zeros((oh, ow, c)), np.zeros((oh, ow), np.int64)  # the whole-scene way
    acc = scene_windows.RowAccumulator(ow, c)
    out = []
    for k in range(len(rows)):
        j = np.flatnonzero(keep[k])
        i = np.full(len(j), k)
        scene_windows.accumulate(sums, counts, probs[k, j], (rlo[i], rhi[i]), (clo[j], chi[j]))
        acc.add(probs[k, j], (rlo[i], rhi[i]), (clo[j], chi[j]))
        done = oh if k + 1 == len(rows) else int(rlo[k + 1])  # no later window reaches them
        out.append(acc.pop(done))
        assert len(acc.sums) <= size // stride + 2  # only the open rows are held
    got = np.concatenate(out)
    np.testing.assert_array_equal(got, scene_windows.blend(sums, counts))
    assert np.isnan(got).any() and np.isfinite(got).any()
    assert acc.pop(oh).shape == (0, ow, c)
    with pytest.raises(ValueError, match="covers output row 0, already written"):
        acc.add(probs[0, :1], (rlo[:1], rhi[:1]), (clo[:1], chi[:1]))


def test_scene_reader_reads_bands_of_rows_in_the_models_units(scenes, tmp_path):
    s1, s2 = scenes["nodata"]
    x1, _, _ = _read(s1)
    x2, _, _ = _read(s2)
    linear = str(tmp_path / "s1_linear.tif")
    _write_like(linear, (10 ** (x1 / 10)).astype(np.float32), s1)
    with rasterio.open(linear) as f1, rasterio.open(s2) as f2:
        reader = scene_reader.SceneReader(f1, f2, [1, 2], [2, 3, 4], 120, s1_linear=True,
                                          s2_scale=0.5)
        band = reader.read(60)
        np.testing.assert_allclose(band.s1, x1[60:180], atol=1e-4)  # back in dB
        np.testing.assert_array_equal(band.s2, x2[60:180, :, 1:4].astype(np.float32) * 0.5)
        assert band.top == 60 and band.s2.dtype == np.float32
        np.testing.assert_array_equal(band.valid[:, :260], True)
        np.testing.assert_array_equal(band.valid[:, 260:], False)  # the no-data edge
        bands = list(reader.bands([0, 120, 60]))
    assert [b.top for b in bands] == [0, 120, 60]
    np.testing.assert_array_equal(bands[2].s2, band.s2)


def test_a_missing_s2_with_zero_means_leaves_every_s1_pixel_valid(scenes):
    """A weight file's preset can have S2 means of 0 (value / 10000): the stand-in of a missing
    S2 then reads zeros, which must not count as Sentinel-2's no-data fill."""
    s1, _ = scenes["nodata"]
    x1, _, _ = _read(s1)
    spec = {"bands": ["B02", "B03"], "mean": [0.0, 0.0], "std": [1e4, 1e4]}
    with rasterio.open(s1) as f1:
        absent = scene_reader.AbsentModality(f1, spec)
        band = scene_reader.SceneReader(f1, absent, [1, 2], [1, 2], 120).read(0)
    np.testing.assert_array_equal(band.s2, 0.0)
    np.testing.assert_array_equal(band.valid, np.isfinite(x1[:120]).all(-1))
    assert band.valid.any()


def _run_tag(path):
    if path.endswith(".png"):
        from PIL import Image

        with Image.open(path) as im:
            return im.info.get(map_writer.RUN_TAG)
    with rasterio.open(path) as src:
        return src.tags().get(map_writer.RUN_TAG)


def _write_run(out, run_id, *, labels=True, quicklook=True, rows=None):
    """A small finished map (2 x 3 cells, 2 classes) written by a MapWriter as run `run_id`."""
    profile = dict(driver="GTiff", width=3, height=2, crs="EPSG:32633",
                   transform=rasterio.Affine(600.0, 0.0, 399960.0, 0.0, -600.0, 5000040.0))
    rows = np.full((2, 3, 2), 0.7, np.float32) if rows is None else rows

    def draw(src, dst):
        from mosaic_jax.inference.quicklook import write_quicklook

        write_quicklook(src, dst, ["a", "b"], ["a", "b"], title=["t"], run_id=run_id)

    with map_writer.MapWriter(out, profile, ["a", "b"], labels_threshold=0.5 if labels else None,
                              run_id=run_id, log=lambda s: None) as writer:
        writer.write_rows(rows[:1])
        writer.write_rows(rows[1:])
        return writer.finish(draw if quicklook else None)


def test_map_writer_writes_rows_and_tags_every_file(tmp_path):
    rows = np.array([[[0.2, 0.9], [np.nan, np.nan], [0.5, 0.1]],
                     [[0.6, 0.4], [0.3, 0.3], [0.0, 1.0]]], np.float32)
    out = str(tmp_path / "m.tif")
    paths = _write_run(out, "run-1", rows=rows)
    assert paths == {"map": out, "labels": str(tmp_path / "m_labels.tif"),
                     "quicklook": str(tmp_path / "m.png")}
    np.testing.assert_array_equal(_read(out)[0], rows)
    labels = _read(paths["labels"])[0]
    np.testing.assert_array_equal(labels, scene_windows.multi_hot(rows, 0.5))
    assert labels[0, 1].tolist() == [255, 255]
    assert {_run_tag(p) for p in paths.values()} == {"run-1"}
    assert sorted(os.listdir(tmp_path)) == ["m.png", "m.tif", "m_labels.tif"]  # no temp left


def test_a_map_writer_that_fails_to_open_its_files_leaves_no_temp_folder(tmp_path, monkeypatch):
    opened = []
    real_open = map_writer.rasterio.open

    def open_once(path, *args, **kwargs):  # the labels file cannot be created
        if opened:
            raise rasterio.errors.RasterioIOError("disk full")
        opened.append(real_open(path, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(map_writer.rasterio, "open", open_once)
    with pytest.raises(rasterio.errors.RasterioIOError, match="disk full"):
        _write_run(str(tmp_path / "m.tif"), "r")
    assert opened[0].closed and os.listdir(tmp_path) == []


@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_a_run_killed_while_publishing_leaves_files_of_one_run(tmp_path, monkeypatch, kill_after):
    """Run "new" dies after `kill_after` of its files are moved into place (a SIGKILL between
    publications); whatever is on disk must belong to the map on disk."""
    out = str(tmp_path / "m.tif")
    _write_run(out, "old")
    moves = []
    real_move = map_writer._move

    def dying_move(local, path):
        if len(moves) == kill_after:
            raise KeyboardInterrupt("killed")
        moves.append(path)
        real_move(local, path)

    monkeypatch.setattr(map_writer, "_move", dying_move)
    with pytest.raises(KeyboardInterrupt):
        _write_run(out, "new")
    map_run = _run_tag(out)
    assert map_run == ("old" if kill_after == 0 else "new")
    for companion in ("m_labels.tif", "m.png"):
        path = str(tmp_path / companion)
        if os.path.exists(path):
            assert _run_tag(path) == map_run, (companion, kill_after)
    assert moves[:1] in ([], [out])  # the map goes first


def test_stale_temp_folders_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".m.tif.predict-{dead_pid}-abc"
    live = tmp_path / f".m.tif.predict-{os.getpid()}-def"
    other = tmp_path / f".n.tif.predict-{dead_pid}-ghi"  # another output's: not ours to judge
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "probs.tif").write_bytes(b"partial")
    messages = []
    removed = map_writer.remove_stale_temp(str(tmp_path / "m.tif"), messages.append)
    assert removed == [str(stale)] and not stale.exists()
    assert live.exists() and other.exists()
    assert len(messages) == 1 and str(stale) in messages[0]
    _write_run(str(tmp_path / "n.tif"), "r")  # a run writing n.tif cleans n.tif's
    assert not other.exists() and live.exists()


# ----------------------------------------------------------------------------------------------
# Outputs that are inputs, inputs in the wrong units


def _digest(path):
    with open(path, "rb") as f:
        return hash(f.read())


def test_an_output_that_is_an_input_is_refused_before_any_work(tiny, scenes, tmp_path,
                                                              monkeypatch):
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    work = tmp_path / "w"
    work.mkdir()
    for name, src in (("s1.tif", s1), ("s2.tif", s2)):
        (work / name).write_bytes(pathlib.Path(src).read_bytes())
    os.symlink(work / "s2.tif", work / "link.tif")
    os.link(work / "s1.tif", work / "hard.tif")
    (work / "x_labels.tif").write_bytes(pathlib.Path(s1).read_bytes())
    (work / "y.png").write_bytes(pathlib.Path(s2).read_bytes())
    monkeypatch.chdir(work)
    a1, a2 = str(work / "s1.tif"), str(work / "s2.tif")
    before = {p: _digest(work / p) for p in os.listdir(work)}
    monkeypatch.setattr(predict, "load_embedder", lambda d: pytest.fail("work started"))
    cases = [  # (s1, s2, output, the input it would overwrite)
        (a1, a2, a2, a2), (a1, a2, "s2.tif", a2), (a1, a2, str(work / "link.tif"), a2),
        (a1, a2, "hard.tif", a1), (a1, "link.tif", a2, "link.tif"),
        (str(work / "x_labels.tif"), a2, str(work / "x.tif"), str(work / "x_labels.tif")),
        (a1, "y.png", "y.tif", "y.png"),
    ]
    for in1, in2, output, victim in cases:
        with pytest.raises(ValueError, match=re.escape(output) + ".* would overwrite the "
                           "--s[12] input " + re.escape(victim)):
            predict.predict_scene(export_dir, in1, in2, output, labels_threshold=0.5,
                                  progress=False)
    assert {p: _digest(work / p) for p in os.listdir(work)} == before
    with pytest.raises(ValueError, match="--output gs://b/s2.tif would overwrite the --s2 "
                                         "input /vsigs/b/s2.tif"):
        map_writer.check_outputs_spare_inputs({"--s2": "/vsigs/b/s2.tif"},
                                              map_writer.output_paths("gs://b/s2.tif"))
    map_writer.check_outputs_spare_inputs({"--s2": "gs://b/s2.tif"},
                                          map_writer.output_paths("gs://c/s2.tif"))
    with pytest.raises(ValueError, match="must be three different files"):
        write_fake_scene("s1.tif", "s2.tif", reference_path="./s1.tif")


def test_s2_reflectance_in_0_to_1_is_converted_and_said(tiny, scenes, tmp_path):
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    x2 = _read(s2)[0]
    fraction = str(tmp_path / "s2_fraction.tif")
    _write_like(fraction, (x2 / 10000.0).astype(np.float32), s2, nodata=None)
    messages = []
    out, ref = str(tmp_path / "f.tif"), str(tmp_path / "ref.tif")
    summary = predict.predict_scene(export_dir, s1, fraction, out, stride=120, quicklook=False,
                                    progress=False, log=messages.append)
    predict.predict_scene(export_dir, s1, s2, ref, stride=120, quicklook=False, progress=False)
    assert summary["s2_scale"] == 10000.0
    assert any(fraction in m and "multiplying it by 10000" in m for m in messages)
    np.testing.assert_allclose(_read(out)[0], _read(ref)[0], atol=1e-5)


def test_s2_far_outside_the_models_range_is_refused_naming_the_band(tiny, scenes, tmp_path):
    export_dir, _ = tiny
    s1, s2 = scenes["grid"]
    x2 = _read(s2)[0].astype(np.float64)
    eight_bit = str(tmp_path / "s2_8bit.tif")  # a display stretch: 0..255
    _write_like(eight_bit, np.clip(x2 / 40, 1, 255).astype(np.uint8), s2)
    with pytest.raises(ValueError, match=re.escape(eight_bit) + r": even its brightest band "
                       r"B\w+ stays below .*8-bit.*expects L2A reflectance x 10000"):
        predict.predict_scene(export_dir, s1, eight_bit, str(tmp_path / "x.tif"),
                              progress=False)
    huge = str(tmp_path / "s2_huge.tif")
    _write_like(huge, (x2 * 10000).astype(np.float32), s2)
    with pytest.raises(ValueError, match=re.escape(huge) + r": even its darkest band B\w+ "
                       "stays above"):
        predict.predict_scene(export_dir, s1, huge, str(tmp_path / "x.tif"), progress=False)
    assert not os.path.exists(tmp_path / "x.tif")


def test_s2_units_check_on_arrays():
    spec = {"bands": ["B02", "B08"], "mean": [438.0, 2193.0], "std": [607.0, 1369.0],
            "units": "L2A reflectance x 10000"}
    rng = np.random.default_rng(5)
    x = np.stack([rng.uniform(200, 900, 500), rng.uniform(1500, 4000, 500)])
    assert input_units.s2_scale(x, spec, "a.tif", is_float=False) == 1.0
    assert input_units.s2_scale(x / 1e4, spec, "a.tif", is_float=True) == 10000.0
    with pytest.raises(ValueError, match=r"a\.tif: even its brightest band B08 stays below"):
        input_units.s2_scale(x / 1e4, spec, "a.tif", is_float=False)  # integers cannot be 0..1
    zeros = x.copy()
    zeros[:, :400] = 0  # S2 fill: not counted
    assert input_units.s2_scale(zeros, spec, "a.tif", is_float=False) == 1.0
    assert input_units.s2_scale(x / 1e4, {**spec, "units": "other"}, "a", is_float=True) == 1.0
    # A weight file's preset (value / 10000: mean 0, std 10000) is no brightness reference: the
    # check uses a typical brightest band instead, so a real scene passes and 8-bit is refused.
    preset = {**spec, "mean": [0.0, 0.0], "std": [10000.0, 10000.0], "norm": "ssl4eo_s2_l1c"}
    assert input_units.s2_scale(x, preset, "a.tif", is_float=False) == 1.0
    with pytest.raises(ValueError, match=r"a\.tif: even its brightest band B08 stays below .*"
                       r"typically about 2500"):
        input_units.s2_scale(x / 20, preset, "a.tif", is_float=False)


@pytest.mark.parametrize("value,key", [(0.0, r"inputs\.s2\.std\[3\] \(B05\) is 0\.0"),
                                       (-2.0, r"inputs\.s2\.std\[3\] \(B05\) is -2\.0"),
                                       (float("nan"), r"inputs\.s2\.std\[3\] \(B05\) is nan")])
def test_a_model_json_std_that_is_not_positive_is_refused(tiny, scenes, tmp_path, value, key):
    export_dir, info = tiny
    broken = tmp_path / "export"
    shutil.copytree(export_dir, broken)
    model = json.loads((broken / "model.json").read_text())
    assert model["inputs"]["s2"]["bands"][3] == "B05"
    model["inputs"]["s2"]["std"][3] = value
    (broken / "model.json").write_text(json.dumps(model))
    s1, s2 = scenes["grid"]
    with pytest.raises(ValueError, match=re.escape(str(broken / "model.json")) + ": " + key):
        predict.predict_scene(str(broken), s1, s2, str(tmp_path / "x.tif"), progress=False)
    assert not os.path.exists(tmp_path / "x.tif")


# ----------------------------------------------------------------------------------------------
# The quick look, the fake scene's truth, the map against it


def test_quicklook_names_scene_model_classes_and_no_data(tiny, scenes, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    export_dir, info = tiny
    s1, s2 = scenes["nodata"]
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self),
                                                                  save(self, *a, **k))[1])
    out = str(tmp_path / "q.tif")
    summary = predict.predict_scene(export_dir, s1, s2, out, stride=60, progress=False,
                                    quicklook_note="from S1 only (test)")
    (fig,) = figures
    title = fig._suptitle.get_text()
    assert os.path.basename(s2) in title and os.path.basename(s1) in title
    assert "export (" in title and info["objective"] in title
    assert title.splitlines()[-1] == "from S1 only (test)"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    chosen = summary["quicklook_classes"]
    assert legend == [f"{c}: {n}" for c, n in zip(("red", "green", "blue"), chosen,
                                                   strict=True)] + ["grey: no data"]
    assert _run_tag(summary["quicklook"]) == summary["run_id"] == _run_tag(out)
    rgb = quicklook.composite(np.array([[[0.2, np.nan]], [[0.5, np.nan]]], np.float32))
    np.testing.assert_allclose(rgb[0, 0], [0.2, 0.5, 0.0])
    np.testing.assert_allclose(rgb[0, 1], [quicklook.NODATA_GREY] * 3)


def test_fake_scene_reference_holds_the_classes_its_pixels_were_made_of(tmp_path):
    from data_builders import fake_bigearthnet, reference_labels
    from data_builders.bigearthnet_v2.bigearthnet_v2 import CLASS_NAMES, S2_BANDS
    from data_builders.fake_scene import patch_row

    s1, s2, ref = (str(tmp_path / n) for n in ("s1.tif", "s2.tif", "ref.tif"))
    write_fake_scene(s1, s2, height=240, width=300, seed=7, nodata_edge=30, reference_path=ref)
    classes, transform, crs = _read(ref)
    classes = classes[..., 0]
    x2, t2, c2 = _read(s2)
    assert (transform, crs) == (t2, c2) and classes.shape == x2.shape[:2]
    with rasterio.open(ref) as src:
        assert reference_labels.class_names_of(src.tags(), ref) == list(CLASS_NAMES)
        assert src.nodata == 255 and src.descriptions == ("class_index",)
    rng = np.random.default_rng(7)  # the scene's first patch row, regenerated
    np.testing.assert_array_equal(classes[:120, :270], patch_row(rng, 300)[2][:, :270])
    assert (classes[:, 270:] == 255).all() and (x2[:, 270:] == 0).all()
    # Meaning: the pixels of each class carry that class's reflectance (10 m bands).
    ten_m = [S2_BANDS.index(b) for b in ("B02", "B03", "B04", "B08")]
    for c in np.unique(classes[classes != 255]):
        pixels = x2[classes == c][:, ten_m].astype(np.float64)
        if len(pixels) < 2000:
            continue
        signature = fake_bigearthnet._SIGNATURES[c, ten_m]
        np.testing.assert_allclose(np.median(pixels, axis=0), signature, rtol=0.35,
                                   err_msg=CLASS_NAMES[c])


def test_reference_cells_and_ap_against_a_brute_force_reference():
    rng = np.random.default_rng(8)
    classes = rng.integers(0, 4, size=(25, 17)).astype(np.uint8)
    classes[rng.uniform(size=classes.shape) < 0.2] = 255
    classes[:10, :10] = 255  # a fully unlabelled cell
    truth, labelled = map_accuracy.reference_cells(classes, 10, 4)
    assert truth.shape == (3, 2, 4)
    for y in range(3):
        for x in range(2):
            block = classes[y * 10:(y + 1) * 10, x * 10:(x + 1) * 10]
            assert truth[y, x].tolist() == [bool((block == c).any()) for c in range(4)]
            assert labelled[y, x] == bool((block != 255).any())
    probs = rng.uniform(size=(3, 2, 4))
    probs[2, 1] = np.nan  # a cell without data
    ap, positives, cells = map_accuracy.cell_average_precision(probs, truth, labelled)
    use = labelled & np.isfinite(probs).all(-1)
    assert cells == use.sum() == 4
    from mosaic_jax.evaluation.metrics import average_precision_per_class

    np.testing.assert_array_equal(ap, average_precision_per_class(probs[use], truth[use]))
    np.testing.assert_array_equal(positives, truth[use].sum(0))


def test_predict_reports_the_maps_ap_against_the_fake_scenes_truth(tiny, tmp_path):
    export_dir, info = tiny
    s1, s2, ref = (str(tmp_path / n) for n in ("s1.tif", "s2.tif", "ref.tif"))
    write_fake_scene(s1, s2, height=240, width=360, seed=9, nodata_edge=100, reference_path=ref)
    out = str(tmp_path / "map.tif")
    result = predict.predict_scene(export_dir, s1, s2, out, stride=60, quicklook=False,
                                   progress=False, reference=ref)["reference"]
    got, _, _ = _read(out)
    truth, labelled = map_accuracy.reference_cells(_read(ref)[0][..., 0], 60, 19)
    use = labelled & np.isfinite(got).all(-1)
    from mosaic_jax.evaluation.metrics import average_precision_per_class

    want = average_precision_per_class(got[use], truth[use])
    assert result["cells"] == use.sum() == 4 * 5  # the last column of cells has no data
    assert result["class_names"] == info["class_names"]
    np.testing.assert_allclose([np.nan if a is None else a for a in result["ap"]], want)
    chance = [None if a is None else a for a in result["chance_ap"]]
    np.testing.assert_allclose([np.nan if a is None else a for a in chance],
                               np.where(np.isnan(want), np.nan, truth[use].mean(0)))
    table = map_accuracy.format_ap_table(result)
    assert table.count("\n") == 19 + 2 and "| **mean over classes with cells** | 20 cells" in table
    # The truth as a map has AP 1 for every class it holds.
    perfect = str(tmp_path / "perfect.tif")
    _write_like(perfect, truth.astype(np.float32), out)
    perfect_ap = map_accuracy.evaluate_map(perfect, ref)["ap"]
    assert all(a == 1.0 for a in perfect_ap if a is not None)
    with pytest.raises(ValueError, match="is not the grid of reference"):
        map_accuracy.evaluate_map(out, _shifted(ref, tmp_path))


def _shifted(path, tmp_path):
    moved = str(tmp_path / "moved_ref.tif")
    data, transform, _ = _read(path)
    _write_like(moved, data, path, transform=transform @ transform.translation(1, 0))
    with rasterio.open(path) as src, rasterio.open(moved, "r+") as dst:
        dst.update_tags(**src.tags())
    return moved
