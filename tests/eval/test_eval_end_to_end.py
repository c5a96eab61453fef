"""Every probe end to end on CPU: toy sets in both formats, a random-init terrafm_tiny checkpoint."""

import json

import numpy as np
import pytest
from eval_toydata import GEOBENCH_S2, NUM_CLASSES, SIZE, make_splits, with_cirrus, write_hdf5

from terrafm.cli import main
from terrafm.eval import features
from terrafm.eval.runner import EvalConfig, evaluate
from terrafm.models import load_checkpoint

FAST = dict(linear_epochs=40, seg_epochs=30, fractions=(1.0, 0.05))


def run_eval(ckpt, data, fmt, out, **kw) -> dict:
    cfg = EvalConfig(checkpoint=str(ckpt), data=str(data), format=fmt, out=str(out), **{**FAST, **kw})
    return evaluate(cfg, load_checkpoint(ckpt))


def scores(results: dict) -> dict[tuple[str, float], dict]:
    return {(r["probe"], r["fraction"]): r for r in results["runs"]}


def test_separable_hdf5_scores_near_100_and_writes_json_and_pngs(tiny_pth, hdf5_data, tmp_path):
    res = run_eval(tiny_pth, hdf5_data, "hdf5", tmp_path / "out")
    runs = scores(res)
    assert runs[("knn", 1.0)]["top1"] >= 0.95 and runs[("linear", 1.0)]["top1"] >= 0.95
    assert runs[("knn", 1.0)]["f1_macro"] >= 0.95
    assert runs[("knn", 0.05)]["train_samples"] == NUM_CLASSES  # 5% of 20 per class = 1 each
    assert runs[("knn", 0.05)]["top1"] >= 0.8  # one clean example per class still separates them
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["modality"] == "s2_l1c" and on_disk["splits"] == {"train": 80, "test": 40, "val": 20}
    for r in on_disk["runs"]:
        assert (tmp_path / "out" / r["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
        assert np.sum(r["confusion_matrix"]) == 40


def test_label_shuffled_training_set_scores_near_chance(tiny_pth, tmp_path):
    splits = make_splits(13, seed=2)
    images, labels = splits["train"]
    splits["train"] = (images, np.random.default_rng(0).permutation(labels))
    data = write_hdf5(tmp_path / "shuffled", splits, GEOBENCH_S2)
    runs = scores(run_eval(tiny_pth, data, "hdf5", tmp_path / "out", fractions=(1.0,)))
    for probe in ("knn", "linear"):
        assert runs[(probe, 1.0)]["top1"] < 0.6, probe  # chance is 0.25 with 4 classes, 40 test images


def test_cli_on_geotiff_folder_reuses_cached_features(tiny_pth, folder_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", str(tiny_pth), "--data", str(folder_data), "--format", "folder",
            "--probe", "knn", "--fractions", "1.0", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["modality"] == "s2_l1c" and scores(res)[("knn", 1.0)]["top1"] >= 0.95
    assert len(list((out / "cache").glob("features_*.npz"))) == 2  # train, test (no val split)

    def no_extract(*a, **k):
        raise AssertionError("features were recomputed although they are cached")

    monkeypatch.setattr(features, "extract", no_extract)
    monkeypatch.setattr("terrafm.eval.runner.extract", no_extract)
    assert main(argv) == 0


def test_cli_reports_bad_inputs_without_a_traceback(tiny_pth, tmp_path, capsys):
    data = write_hdf5(tmp_path / "five", {"train": make_splits(5)["train"]}, GEOBENCH_S2[:5])
    assert main(["eval", "--checkpoint", str(tiny_pth), "--data", str(data), "--format", "hdf5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "fit no modality" in capsys.readouterr().err


def test_probe_that_does_not_fit_the_task_is_refused(tiny_pth, hdf5_data, tmp_path):
    with pytest.raises(ValueError, match=r"\['seg'\] do not apply to a classification dataset"):
        run_eval(tiny_pth, hdf5_data, "hdf5", tmp_path / "o", probes=("seg",))


def segmentation_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Masks of 2x2 patch-aligned 16 px blocks, each block one of 3 classes with its own bright bands."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 24), ("test", 8)):
        blocks = rng.integers(0, 3, size=(n, 2, 2))
        masks = blocks.repeat(16, axis=1).repeat(16, axis=2)
        images = rng.normal(1000, 150, size=(n, 13, SIZE, SIZE))
        for c in range(3):
            images[:, 3 * c: 3 * c + 3] += 3000 * (masks == c)[:, None]
        out[split] = (np.clip(with_cirrus(images, rng), 0, 65535).astype(np.uint16), masks.astype(np.uint8))
    return out


def test_segmentation_probe_on_hdf5_masks(tiny_pth, tmp_path):
    data = write_hdf5(tmp_path / "seg", segmentation_splits(0), GEOBENCH_S2)
    res = run_eval(tiny_pth, data, "hdf5", tmp_path / "out", fractions=(1.0,))
    assert res["task"] == "segmentation" and [r["probe"] for r in res["runs"]] == ["seg"]
    assert res["runs"][0]["miou"] >= 0.8


def test_every_probe_from_a_terrafm_pretrain_checkpoint_and_its_export(hdf5_data, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["pretrain", "--out", str(run_dir), "train.max_steps=2", "train.checkpoint_every=2"]) == 0
    seg_data = write_hdf5(tmp_path / "seg", segmentation_splits(1), GEOBENCH_S2)
    for data, wanted in ((hdf5_data, {"knn", "linear"}), (seg_data, {"seg"})):
        out = tmp_path / f"out_{data.name}"
        assert main(["eval", "--checkpoint", str(run_dir), "--data", str(data), "--format", "hdf5",
                     "--probe", "all", "--fractions", "1.0", "--linear-epochs", "40", "--seg-epochs", "30",
                     "--out", str(out)]) == 0
        res = json.loads((out / "results.json").read_text())
        assert {r["probe"] for r in res["runs"]} == wanted
        for r in res["runs"]:
            assert r.get("top1", r.get("miou")) >= 0.8, r
    exported = tmp_path / "tiny.safetensors"
    assert main(["export", str(run_dir / "checkpoints" / "latest"), str(exported)]) == 0  # the pointer eval takes too
    assert main(["eval", "--checkpoint", str(exported), "--data", str(hdf5_data), "--format", "hdf5",
                 "--probe", "knn", "--fractions", "1.0", "--out", str(tmp_path / "out_st")]) == 0
    res = json.loads((tmp_path / "out_st" / "results.json").read_text())
    from_run = json.loads((tmp_path / f"out_{hdf5_data.name}" / "results.json").read_text())
    assert from_run["checkpoint"] == str(run_dir / "checkpoints" / "step_00000002")
    # the pointer itself resolves to the same step (results.json named the pointer file, and the cache keyed on it)
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoints" / "latest"), "--data", str(hdf5_data), "--format",
                 "hdf5", "--probe", "knn", "--fractions", "1.0", "--out", str(tmp_path / "out_latest")]) == 0
    assert json.loads((tmp_path / "out_latest" / "results.json").read_text())["checkpoint"] == from_run["checkpoint"]
    assert res["runs"][0]["top1"] >= 0.95
    assert res["statistics"] == from_run["statistics"] == "checkpoint"  # the export carries the run's statistics
    assert res["runs"][0]["confusion_matrix"] == from_run["runs"][0]["confusion_matrix"]  # and its numbers


def test_multilabel_hdf5_reports_f1(tiny_pth, tmp_path):
    rng = np.random.default_rng(3)
    splits = {}
    for split, n in (("train", 60), ("test", 20)):
        hot = np.zeros((n, NUM_CLASSES), dtype=np.uint8)
        for i in range(n):
            hot[i, rng.choice(NUM_CLASSES, size=2, replace=False)] = 1
        bright = 3000.0 * hot.repeat(3, axis=1).astype(np.float64)[:, :, None, None]  # 12 of 13 bands
        images = rng.normal(1000, 150, size=(n, 13, SIZE, SIZE))
        images[:, :12] += bright
        splits[split] = (np.clip(with_cirrus(images, rng), 0, 65535).astype(np.uint16), hot)
    data = write_hdf5(tmp_path / "ml", splits, GEOBENCH_S2)
    res = run_eval(tiny_pth, data, "hdf5", tmp_path / "out", fractions=(1.0,))
    assert res["task"] == "multilabel"
    for r in res["runs"]:
        assert r["f1_micro"] >= 0.9 and r["f1_macro"] >= 0.9, r
        assert r["map_macro"] >= 0.9 and r["map_micro"] >= 0.9, r  # the ranking metric of BigEarthNet's literature


def test_segmentation_probe_on_a_folder_of_images_and_masks(tiny_pth, tmp_path):
    root = tmp_path / "segfolder"
    for split, (images, masks) in segmentation_splits(2).items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
            np.save(root / split / "images" / f"{i:03d}.npy", img)
            np.save(root / split / "masks" / f"{i:03d}.npy", mask)
    res = run_eval(tiny_pth, root, "folder", tmp_path / "out", fractions=(1.0,))
    assert res["task"] == "segmentation" and res["runs"][0]["miou"] >= 0.8


def test_cache_key_of_a_run_folder_follows_its_latest_checkpoint(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in ("step_00000002", "step_00000004"):
        (ckpts / step).mkdir(parents=True)
        (ckpts / step / ".metadata").write_bytes(b"x")
        (ckpts / step / "meta.json").write_text("{}")
        (ckpts / step / "manifest.json").write_text('{"files": {}}')
    (ckpts / "latest").write_text("step_00000002")
    key = lambda: features.cache_key(tmp_path / "run", tmp_path, "train", "s2_l2a", None, "cls")  # noqa: E731
    first = key()
    assert key() == first
    (ckpts / "latest").write_text("step_00000004")
    assert key() != first


def test_a_run_folder_is_resolved_once_for_the_weights_the_cache_and_the_results(hdf5_data, tmp_path, monkeypatch):
    """The run folder was resolved to its latest checkpoint twice, once to load the weights and once per split to
    name the feature cache: a run that checkpointed in between filed step N's features under step N+1's name, and a
    later eval of the run scored the wrong step's features (exit 0)."""
    import terrafm.models

    run_dir = tmp_path / "run"
    assert main(["pretrain", "--out", str(run_dir), "train.max_steps=2", "train.checkpoint_every=1",
                 "train.probe=false"]) == 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    real = terrafm.models.load_checkpoint

    def load_then_the_run_moves_on(*args, **kwargs):
        model = real(*args, **kwargs)
        (ckpts / "latest").write_text("step_00000001")  # another step is the run's latest from here on
        return model

    monkeypatch.setattr(terrafm.models, "load_checkpoint", load_then_the_run_moves_on)
    cache = tmp_path / "cache"
    argv = ["eval", "--checkpoint", str(run_dir), "--data", str(hdf5_data), "--format", "hdf5", "--probe", "knn",
            "--fractions", "1.0", "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    assert json.loads((tmp_path / "first" / "results.json").read_text())["checkpoint"] == str(ckpts / "step_00000002")
    splits = len(list(cache.glob("features_*.npz")))
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0  # step 1 now: none of step 2's features fit it
    assert json.loads((tmp_path / "second" / "results.json").read_text())["checkpoint"] == str(ckpts / "step_00000001")
    assert len(list(cache.glob("features_*.npz"))) == 2 * splits  # each split of each step


def test_nodata_pixels_are_filled_counted_and_printed(tiny_pth, tmp_path, capsys):
    """A strip of nodata (NaN in train, the S1 fill value in test) in every image still scores the toy set."""
    splits = make_splits(13, seed=3)
    for name, value in (("train", np.nan), ("test", -9999.0)):
        images = splits[name][0].astype(np.float32)
        images[:, :, :2, :] = value
        splits[name] = (images, splits[name][1])
    data = write_hdf5(tmp_path / "holes", splits, GEOBENCH_S2)
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(tiny_pth), "--data", str(data), "--format", "hdf5", "--probe", "knn",
                 "--fractions", "1.0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    strip = 12 * 2 * SIZE  # the 12 bands kept (B10 dropped) x 2 rows
    assert res["nodata_pixels"] == {"train": 80 * strip, "test": 40 * strip, "val": 0}
    assert scores(res)[("knn", 1.0)]["top1"] >= 0.95
    assert f"nodata pixel values filled with the band mean: train {80 * strip}, test {40 * strip}" in \
        capsys.readouterr().out


def test_a_float_fill_value_is_nodata_and_non_finite_features_are_refused(tiny_pth, tmp_path, monkeypatch, capsys):
    """An untagged float32-max fill in one train image made the band's std ~1e35 and every feature constant (both
    probes at chance, exit 0); a non-finite feature row made every kNN vote NaN (all predictions class 0)."""
    splits = make_splits(13, seed=3)
    images = splits["train"][0].astype(np.float32)
    images[0, :, 0, 0] = np.finfo(np.float32).max
    splits["train"] = (images, splits["train"][1])
    data = write_hdf5(tmp_path / "fill", splits, GEOBENCH_S2)
    res = run_eval(tiny_pth, data, "hdf5", tmp_path / "out", fractions=(1.0,), probes=("knn",))
    assert res["nodata_pixels"]["train"] == 12 and scores(res)[("knn", 1.0)]["top1"] >= 0.95
    real = features.extract

    def nan_row(*args, **kwargs):
        out = real(*args, **kwargs)
        out[1] = np.nan
        return out

    monkeypatch.setattr("terrafm.eval.runner.extract", nan_row)
    assert main(["eval", "--checkpoint", str(tiny_pth), "--data", str(data), "--format", "hdf5", "--probe", "knn",
                 "--fractions", "1.0", "--out", str(tmp_path / "nan"), "--cache-dir", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert "gives non-finite features for 1 train image(s), the first " in err and "Traceback" not in err
    assert err.split("the first ")[1].split(":")[0].endswith("train_0001.hdf5"), err  # named by its file


def test_geobench_label_fraction_partitions_are_used_when_the_dataset_has_them(tiny_pth, tmp_path):
    """GEO-Bench ships its own label subsets (0.01x_train_partition.json, ...); a stratified subset of ours would
    not compare with results reported on them."""
    data = write_hdf5(tmp_path / "gb", make_splits(13, seed=5), GEOBENCH_S2)
    train_ids = json.loads((data / "default_partition.json").read_text())["train"]
    (data / "0.05x_train_partition.json").write_text(json.dumps({"train": train_ids[3:7], "valid": [], "test": []}))
    runs = scores(run_eval(tiny_pth, data, "hdf5", tmp_path / "out", probes=("knn",)))
    assert runs[("knn", 0.05)]["train_samples"] == 4 and runs[("knn", 0.05)]["subset"] == "0.05x_train_partition.json"
    assert runs[("knn", 1.0)]["subset"] == "stratified, seed 0"
    (data / "0.01x_train_partition.json").write_text(json.dumps({"train": train_ids[:2]}))
    half = scores(run_eval(tiny_pth, data, "hdf5", tmp_path / "half", probes=("knn",), fractions=(0.005,)))
    assert half[("knn", 0.005)]["subset"] == "stratified, seed 0"  # 0.005 rounds to 0.01 but is not that file's
    (data / "0.05x_train_partition.json").write_text(json.dumps({"train": ["test_0001"]}))
    with pytest.raises(ValueError, match="not in default_partition.json's train split \\(e.g. 'test_0001'\\)"):
        run_eval(tiny_pth, data, "hdf5", tmp_path / "out2", probes=("knn",))
