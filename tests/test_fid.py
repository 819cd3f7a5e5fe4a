"""FID/KID on clean-fid: the scores on folders the tests make, statistics files, and bad input."""

from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluation.inception_features as inception
from evaluation.errors import EvaluationError
from evaluation.fid_reference_stats import folder_statistics, reference_statistics, stats_path
from evaluation.fid_statistics import Statistics, fid, kid
from evaluation.inception_features import FeatureOptions, features, list_images, load_inception
from tests.fid_helpers import digit_images, tiny_extractor, write_folder

QUIET = FeatureOptions(progress=False)

N = 96  # images per set: above the test features' 16 dimensions


def stats_of(folder: Path, mode: str = "legacy_tensorflow") -> Statistics:
    extractor = tiny_extractor(mode)
    files = list_images(folder)
    feats = features(files, extractor, progress=False)
    return Statistics.from_features(feats, mode, extractor.name, "16x16", source=str(folder))


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid")
    out = {
        "reference": write_folder(root / "reference", digit_images(N, seed=0)),
        "same": write_folder(root / "same", digit_images(N, seed=0)),
    }
    for noise in (0.3, 0.6, 1.0):
        out[f"noise{noise}"] = write_folder(root / f"noise{noise}", digit_images(N, seed=1, noise=noise))
    return out


def test_identical_sets_score_zero(sets: dict[str, Path]) -> None:
    a, b = stats_of(sets["reference"]), stats_of(sets["same"])
    assert fid(a, b) == pytest.approx(0.0, abs=1e-6)
    # KID's unbiased estimator leaves out i == j pairs, so the same points give a small negative value
    noisy = kid(stats_of(sets["noise0.6"]), a)
    assert -noisy / 10 < kid(a, b) <= 0


def test_fid_and_kid_grow_with_noise(sets: dict[str, Path]) -> None:
    reference = stats_of(sets["reference"])
    fids = [fid(stats_of(sets[f"noise{n}"]), reference) for n in (0.3, 0.6, 1.0)]
    kids = [kid(stats_of(sets[f"noise{n}"]), reference) for n in (0.3, 0.6, 1.0)]
    assert fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids
    assert all(k > 0 for k in kids)  # KID agrees with FID in sign


def test_kid_is_reproducible_and_leaves_numpy_rng_alone(sets: dict[str, Path]) -> None:
    a, b = stats_of(sets["noise0.3"]), stats_of(sets["reference"])
    np.random.seed(7)
    expected_next = np.random.rand()
    np.random.seed(7)
    assert kid(a, b) == kid(a, b)
    assert np.random.rand() == expected_next


def test_clean_mode_scores_the_same_way(sets: dict[str, Path]) -> None:
    """clean mode resizes every image to 299x299 (PIL bicubic) before the network."""
    reference = stats_of(sets["reference"], "clean")
    assert fid(stats_of(sets["same"], "clean"), reference) == pytest.approx(0.0, abs=1e-6)
    assert fid(stats_of(sets["noise1.0"], "clean"), reference) > fid(stats_of(sets["noise0.3"], "clean"), reference)


def test_statistics_round_trip_through_the_cache(sets: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    extractor = tiny_extractor()
    made = folder_statistics(sets["reference"], extractor, "digits", tmp_path, QUIET)
    path = stats_path(tmp_path, "digits", "legacy_tensorflow")
    assert path.exists() and not path.with_name("digits_legacy_tensorflow.partial").exists()
    # by name, by file and by folder: loaded, not recomputed
    monkeypatch.setattr(inception, "features", lambda *a, **k: pytest.fail("recomputed"))
    for spec in ("digits", str(path)):
        loaded = reference_statistics(spec, extractor, tmp_path)
        np.testing.assert_array_equal(loaded.mu, made.mu)
        np.testing.assert_array_equal(loaded.sigma, made.sigma)
        np.testing.assert_array_equal(loaded.feats, made.feats)
        assert (loaded.count, loaded.mode, loaded.extractor, loaded.resolution) == (
            N,
            made.mode,
            extractor.name,
            "16x16",
        )
    monkeypatch.undo()
    first = reference_statistics(str(sets["same"]), extractor, tmp_path, QUIET)
    monkeypatch.setattr(inception, "features", lambda *a, **k: pytest.fail("recomputed"))
    again = reference_statistics(str(sets["same"]), extractor, tmp_path)
    np.testing.assert_array_equal(first.mu, again.mu)


def test_feature_extraction_resumes_from_its_chunks(sets: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    extractor = tiny_extractor()
    files = list_images(sets["reference"])
    cache = tmp_path / "chunks"
    full = features(files, extractor, cache_dir=cache, chunk_size=32, progress=False)
    assert sorted(p.name for p in cache.glob("*.npy")) == ["00000.npy", "00001.npy", "00002.npy"]
    (cache / "00002.npy").unlink()  # as if interrupted during the last chunk
    calls = []
    real = inception.get_files_features
    monkeypatch.setattr(inception, "get_files_features", lambda f, *a, **k: calls.append(len(f)) or real(f, *a, **k))
    resumed = features(files, extractor, cache_dir=cache, chunk_size=32, progress=False)
    assert calls == [32]
    np.testing.assert_array_equal(resumed, full)
    features(files[:64], extractor, cache_dir=cache, chunk_size=32, progress=False)  # other files: cache restarts
    assert calls == [32, 32, 32]


def test_grayscale_images_are_converted_not_refused(tmp_path: Path) -> None:
    images = digit_images(N, seed=3)
    grey = write_folder(tmp_path / "grey", images, grey=True)
    rgb = write_folder(tmp_path / "rgb", np.asarray([np.asarray(Image.fromarray(a).convert("L")) for a in images]))
    assert Image.open(list_images(grey)[0]).mode == "L"
    assert fid(stats_of(grey), stats_of(rgb)) == pytest.approx(0.0, abs=1e-6)


def test_unlike_statistics_are_refused(sets: dict[str, Path]) -> None:
    a = stats_of(sets["reference"])
    clean = stats_of(sets["reference"], "clean")
    with pytest.raises(EvaluationError, match="mode: legacy_tensorflow .* vs clean"):
        fid(a, clean)
    bigger = Statistics(a.mu, a.sigma, a.feats, a.count, a.mode, a.extractor, "32x32", "ref32")
    with pytest.raises(EvaluationError, match="resolution: 16x16 .* vs 32x32"):
        fid(a, bigger)
    other = Statistics(a.mu, a.sigma, a.feats, a.count, a.mode, "inception-2015-12-05", a.resolution)
    with pytest.raises(EvaluationError, match="extractor"):
        kid(a, other)


def test_too_few_samples_warn_that_the_estimate_is_biased(sets: dict[str, Path], caplog) -> None:
    extractor = tiny_extractor()
    feats = features(list_images(sets["reference"])[:10], extractor, progress=False)
    few = Statistics.from_features(feats, extractor.mode, extractor.name, "16x16", source="ten")
    with caplog.at_level(logging.WARNING, logger="evaluation.fid_statistics"):
        fid(few, stats_of(sets["reference"]))
    assert "10 images from ten for 16-dim features" in caplog.text and "biased" in caplog.text


def test_bad_folders_name_the_problem(tmp_path: Path) -> None:
    extractor = tiny_extractor()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationError, match="no images"):
        reference_statistics(str(empty), extractor, tmp_path / "stats")
    with pytest.raises(EvaluationError, match="does not exist"):
        list_images(tmp_path / "missing")
    broken = write_folder(tmp_path / "broken", digit_images(4, seed=0))
    (broken / "000002.png").write_bytes(b"not a png")
    with pytest.raises(EvaluationError, match="unreadable image .*000002.png"):
        folder_statistics(broken, extractor, "broken", tmp_path / "stats", QUIET)
    mixed = write_folder(tmp_path / "mixed", digit_images(20, seed=0))
    write_folder(tmp_path / "mixed" / "big", digit_images(20, seed=1, size=24))
    with pytest.raises(EvaluationError, match="mixed sizes .*legacy_tensorflow"):
        folder_statistics(mixed, extractor, "mixed", tmp_path / "stats", QUIET)
    # with a resolution every image is center-cropped and resized to it, so mixed sizes are fine
    resized = FeatureOptions(resolution=16, progress=False)
    stats = folder_statistics(mixed, extractor, "mixed", tmp_path / "stats", resized)
    assert (stats.count, stats.resolution) == (40, "16x16")
    with pytest.raises(EvaluationError, match="scripts/fid_stats.py cifar10_train --mode legacy_tensorflow"):
        reference_statistics("cifar10_train", extractor, tmp_path / "stats")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(EvaluationError, match="not a DenoisingZoo statistics file"):
        reference_statistics(str(tmp_path / "junk.npz"), extractor, tmp_path / "stats")


def test_missing_inception_weights_name_the_download(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(EvaluationError, match="inception_path=.*no file there; download https://"):
        load_inception("clean", tmp_path / "nowhere.pt")
    monkeypatch.setattr(inception, "CLEANFID_INCEPTION_DIR", tmp_path)

    def offline(fpath: str) -> str:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(inception, "check_download_inception", offline)
    with pytest.raises(EvaluationError, match="no network .*eval.fid.inception_path=PATH"):
        load_inception("clean")
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded left behind
    (tmp_path / "fake.pt").write_bytes(b"not torchscript")
    with pytest.raises(EvaluationError, match="not the FID Inception TorchScript file"):
        load_inception("clean", tmp_path / "fake.pt")
    with pytest.raises(EvaluationError, match="unknown FID mode"):
        load_inception("legacy_pytorch", tmp_path / "fake.pt")


INCEPTION = Path(os.environ.get("DZ_INCEPTION_PATH", inception.CLEANFID_INCEPTION_DIR / inception.INCEPTION_FILE))


@pytest.mark.skipif(
    not INCEPTION.is_file(),
    reason=f"FID Inception weights not at {INCEPTION} (set DZ_INCEPTION_PATH; download {inception.inception_url})",
)
@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_real_inception(sets: dict[str, Path], mode: str) -> None:
    extractor = load_inception(mode, INCEPTION)
    files = list_images(sets["reference"])[:8]
    feats = features(files, extractor, batch_size=4, progress=False)
    assert feats.shape == (8, 2048) and np.isfinite(feats).all()
