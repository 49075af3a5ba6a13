"""Tests for hkt_jax.data: sources, splits, determinism, resume, host sharding, errors."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hkt_jax.data import CIFAR10_CLASSES, DataConfig, make_datasets
from hkt_jax.data import image_folder
from hkt_jax.data.image_folder import load_image_folder, shared_cifar10_archive
from hkt_jax.data.pipeline import (
    NORMALIZATIONS,
    crop_and_flip,
    load_split,
    resolve_auto_source,
    split_train_validation,
)
from hkt_jax.data.sources import load_cifar_pickle, load_tfds

SHARED_ARCHIVE = shared_cifar10_archive()  # $HKT_SHARED_DATA, else <repo>/../shared/data
SHARED_DATA = SHARED_ARCHIVE.parents[1]


def synthetic(**overrides) -> DataConfig:
    settings = dict(source="synthetic", synthetic_train_size=200, synthetic_test_size=70, validation_size=40)
    return DataConfig(**(settings | overrides))


def build(config: DataConfig, *, batch: int = 32, seed: int = 0, process_index: int = 0, process_count: int = 1):
    return make_datasets(
        config, global_batch_size=batch, seed=seed, process_index=process_index, process_count=process_count
    )


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(left, right) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def as_uint8(images: np.ndarray) -> np.ndarray:
    """Inverts normalization="none"."""
    return np.rint(images * 255).astype(np.uint8)


# ---------------------------------------------------------------- synthetic / pipeline


def test_batches_have_expected_shapes_dtypes_and_sizes():
    data = build(synthetic(), batch=32)
    assert (data.num_train, data.num_validation, data.num_test, data.num_classes) == (160, 40, 70, 10)
    batch = next(data.train)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < 10
    eval_batch = next(data.eval_batches("test"))
    assert eval_batch["mask"].dtype == np.float32 and eval_batch["label"].dtype == np.int32
    assert build(synthetic(name="cifar100", synthetic_train_size=400), batch=8).num_classes == 100


def test_train_order_is_deterministic_per_seed():
    first = take(build(synthetic()).train, 8)
    assert_batches_equal(first, take(build(synthetic()).train, 8))
    other_seed = take(build(synthetic(), seed=1).train, 8)
    assert not np.array_equal(first[0]["image"], other_seed[0]["image"])


def image_ids(source_images: np.ndarray) -> dict[bytes, int]:
    return {image.tobytes(): index for index, image in enumerate(source_images)}


def test_each_epoch_visits_every_train_image_once_in_a_new_order():
    config = synthetic(augment=False, normalization="none")
    ids = image_ids(load_split(config, "train").images)
    train_indices, _ = split_train_validation(200, 40)
    batches = take(build(config, batch=40).train, 8)  # 160 train images: 4 batches per epoch
    seen = [ids[image.tobytes()] for batch in batches for image in as_uint8(batch["image"])]
    epoch_1, epoch_2 = seen[:160], seen[160:]
    assert sorted(epoch_1) == sorted(epoch_2) == train_indices.tolist()
    assert epoch_1 != epoch_2


def test_validation_is_fixed_disjoint_from_train_and_eval_order_is_fixed():
    config = synthetic(augment=False, normalization="none")
    source = load_split(config, "train")
    ids = image_ids(source.images)

    def validation_ids(seed: int) -> list[int]:
        batches = list(build(config, batch=16, seed=seed).eval_batches("validation"))
        return [ids[image.tobytes()] for b in batches for image, m in zip(as_uint8(b["image"]), b["mask"]) if m]

    validation = validation_ids(seed=0)
    assert validation == validation_ids(seed=5) == sorted(validation) and len(validation) == 40
    train_batches = take(build(config, batch=40).train, 4)
    train_seen = {ids[image.tobytes()] for b in train_batches for image in as_uint8(b["image"])}
    assert train_seen.isdisjoint(validation)
    assert train_seen | set(validation) == set(range(200))


def test_low_data_subset_is_per_class_fixed_and_outside_validation():
    config = synthetic(augment=False, normalization="none", train_per_class=3)
    source = load_split(config, "train")
    ids = image_ids(source.images)
    data = build(config, batch=6, seed=0)
    assert data.num_train == 3 * len(np.unique(source.labels))
    seen = {ids[image.tobytes()] for b in take(data.train, 10) for image in as_uint8(b["image"])}
    assert len(seen) == data.num_train  # the stream only ever shows the subset
    assert np.bincount(source.labels[sorted(seen)]).tolist() == [3] * len(np.unique(source.labels))
    other_seed = {
        ids[image.tobytes()] for b in take(build(config, batch=6, seed=7).train, 10) for image in as_uint8(b["image"])
    }
    assert other_seed == seen  # the same images for every run seed
    validation = {
        ids[image.tobytes()]
        for b in data.eval_batches("validation")
        for image, m in zip(as_uint8(b["image"]), b["mask"])
        if m
    }
    assert seen.isdisjoint(validation) and len(validation) == 40
    with pytest.raises(ValueError, match="train_per_class"):
        synthetic(train_per_class=0)
    with pytest.raises(ValueError, match="has only"):
        build(synthetic(train_per_class=500))


def test_validation_size_zero_disables_validation():
    data = build(synthetic(validation_size=0))
    assert (data.num_train, data.num_validation) == (200, 0)
    with pytest.raises(ValueError, match="validation_size"):
        next(data.eval_batches("validation"))


def test_eval_pass_counts_each_image_once_with_padding_mask():
    config = synthetic(normalization="none")
    test_images = load_split(config, "test")
    batches = list(build(config, batch=32).eval_batches("test"))
    assert len(batches) == 3  # 70 images -> 32 + 32 + 6 real / 26 padding
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 70 and mask[:70].all() and not mask[70:].any()
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(as_uint8(images[:70]), test_images.images)  # never augmented
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:70], test_images.labels)
    assert not images[70:].any()


def test_state_restore_resumes_on_exactly_the_next_batches():
    config = synthetic()
    data = build(config, batch=48)  # 160 / 48: the saved position sits mid-epoch and crosses epochs
    take(data.train, 5)
    state = json.loads(json.dumps(data.train.get_state()))
    expected = take(data.train, 6)

    resumed = build(config, batch=48).train
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), expected)


def test_restoring_state_of_another_pipeline_is_refused():
    state = build(synthetic(), batch=32).train.get_state()
    with pytest.raises(ValueError, match="different batches"):
        build(synthetic(), batch=16).train.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_recombine_into_the_global_batch(process_count):
    config = synthetic()
    global_batches = take(build(config, batch=32).train, 7)
    per_process = [
        take(build(config, batch=32, process_index=p, process_count=process_count).train, 7)
        for p in range(process_count)
    ]
    for step, global_batch in enumerate(global_batches):
        for key in ("image", "label"):
            combined = np.concatenate([batches[step][key] for batches in per_process])
            np.testing.assert_array_equal(combined, global_batch[key])

    global_eval = list(build(config, batch=32).eval_batches("test"))
    per_process_eval = [
        list(build(config, batch=32, process_index=p, process_count=process_count).eval_batches("test"))
        for p in range(process_count)
    ]
    for step, global_batch in enumerate(global_eval):
        for key in ("image", "label", "mask"):
            combined = np.concatenate([batches[step][key] for batches in per_process_eval])
            np.testing.assert_array_equal(combined, global_batch[key])


def test_state_is_the_global_step_so_resume_may_change_process_count():
    config = synthetic()
    single = build(config, batch=32).train
    take(single, 3)
    state = single.get_state()
    expected = next(single)
    halves = [build(config, batch=32, process_index=p, process_count=2).train for p in range(2)]
    for half in halves:
        half.set_state(state)
    np.testing.assert_array_equal(np.concatenate([next(h)["image"] for h in halves]), expected["image"])


def test_global_batch_size_must_divide_among_processes():
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        build(synthetic(), batch=32, process_index=0, process_count=3)


def test_default_process_layout_comes_from_jax():
    data = make_datasets(synthetic(), global_batch_size=16, seed=0)
    assert next(data.train)["image"].shape[0] == 16  # single-process run


def test_crop_and_flip_matches_padded_random_crop():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(1, 32, 32, 3)

    def crop(dy: int, dx: int, flip: int) -> np.ndarray:
        return crop_and_flip(image, np.array([dy]), np.array([dx]), np.array([flip]))[0]

    np.testing.assert_array_equal(crop(4, 4, 0), image[0])
    np.testing.assert_array_equal(crop(4, 4, 1), image[0, :, ::-1])
    shifted = crop(0, 8, 0)  # 4 zero rows on top, content moved 4 pixels left
    assert not shifted[:4].any() and not shifted[:, 28:].any()
    np.testing.assert_array_equal(shifted[4:, :28], image[0, :28, 4:])


def test_train_augmentation_crops_and_flips_and_eval_never_changes():
    plain = take(build(synthetic(augment=False, normalization="none")).train, 4)
    augmented = take(build(synthetic(augment=True, normalization="none")).train, 4)
    transforms = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)]
    used = set()
    for plain_batch, augmented_batch in zip(plain, augmented):
        np.testing.assert_array_equal(plain_batch["label"], augmented_batch["label"])
        for original, result in zip(as_uint8(plain_batch["image"]), as_uint8(augmented_batch["image"])):
            matches = [
                (dy, dx, flip)
                for dy, dx, flip in transforms
                if np.array_equal(crop_and_flip(original[None], *np.array([[dy], [dx], [flip]]))[0], result)
            ]
            assert matches, "augmented image is not a padded crop/flip of its source"
            used.add(matches[0])
    assert any(flip for _, _, flip in used) and any((dy, dx) != (4, 4) for dy, dx, _ in used)

    augmented_eval = build(synthetic(augment=True, normalization="none"), seed=0).eval_batches("test")
    plain_eval = build(synthetic(augment=False, normalization="none"), seed=1).eval_batches("test")
    assert_batches_equal(list(augmented_eval), list(plain_eval))


@pytest.mark.parametrize("normalization", ["imagenet", "cifar", "none"])
def test_normalization_maps_pixels_with_mean_and_std(normalization):
    config = synthetic(normalization=normalization)
    source = load_split(config, "test")
    batch = next(build(config, batch=16).eval_batches("test"))
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[normalization])
    np.testing.assert_allclose(batch["image"], (source.images[:16] / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_synthetic_classes_are_separable():
    config = synthetic(synthetic_train_size=1000, synthetic_test_size=300)
    train, test = load_split(config, "train"), load_split(config, "test")
    features = lambda s: s.images.reshape(len(s), 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(s), -1)
    centroids = np.stack([features(train)[train.labels == k].mean(0) for k in range(10)])
    distances = ((features(test)[:, None] - centroids[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == test.labels).mean() > 0.9


# ---------------------------------------------------------------- image folder


def write_image_folder(root: Path, classes=("zebra", "apple", "mango"), per_class: int = 3, seed: int = 0) -> dict:
    """PNG (lossless) for even files, JPEG for odd; returns the PNG pixels by (split, class, index)."""
    rng = np.random.default_rng(seed)
    pngs = {}
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                if i % 2 == 0:
                    Image.fromarray(pixels).save(root / split / name / f"{i:04d}.png")
                    pngs[split, name, i] = pixels
                else:
                    Image.fromarray(pixels).save(root / split / name / f"{i:04d}.jpg", quality=95)
    return pngs


def test_image_folder_sorts_classes_and_decodes_png_and_jpg(tmp_path):
    pngs = write_image_folder(tmp_path / "folder")
    train = load_image_folder(tmp_path / "folder", "train")
    assert train.class_names == ("apple", "mango", "zebra")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(train.images[0], pngs["train", "apple", 0])
    np.testing.assert_array_equal(train.images[8], pngs["train", "zebra", 2])

    reordered = load_image_folder(tmp_path / "folder", "train", class_names=("zebra", "apple", "mango"))
    assert reordered.labels.tolist() == [1, 1, 1, 2, 2, 2, 0, 0, 0]

    data = build(DataConfig(source="image_folder", path=str(tmp_path / "folder"), validation_size=3), batch=4)
    assert (data.num_train, data.num_validation, data.num_test, data.num_classes) == (6, 3, 9, 3)


def test_image_folder_uses_cifar10_label_order_for_cifar10_class_names(tmp_path):
    write_image_folder(tmp_path / "folder", classes=CIFAR10_CLASSES[::-1], per_class=1)
    test = load_image_folder(tmp_path / "folder", "test")
    assert test.class_names == CIFAR10_CLASSES and test.labels.tolist() == list(range(10))


def make_archive(folder: Path, archive: Path, top_level: str | None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=f"{top_level}/{split}" if top_level else split)
    return archive


@pytest.mark.parametrize("top_level", [None, "wrapped"])
def test_tar_gz_is_extracted_once_and_decoded_splits_are_cached(tmp_path, monkeypatch, top_level):
    write_image_folder(tmp_path / "folder")
    archive = make_archive(tmp_path / "folder", tmp_path / "tiny-set.tar.gz", top_level)
    cache = tmp_path / "cache"
    expected = load_image_folder(tmp_path / "folder", "test")
    config = DataConfig(source="image_folder", path=str(archive), cache_dir=str(cache), validation_size=3)
    first_run = build(config, batch=3)
    assert (first_run.num_train, first_run.num_test, first_run.class_names) == (6, 9, ("apple", "mango", "zebra"))
    assert (cache / "tiny-set").is_dir()
    assert sorted(p.name for p in cache.glob("*.npz")) == ["tiny-set.test.npz", "tiny-set.train.npz"]

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the split was cached")

    monkeypatch.setattr(image_folder, "_decode", no_decoding)
    second_run = build(config, batch=3)
    assert_batches_equal(list(first_run.eval_batches("test")), list(second_run.eval_batches("test")))
    cached = load_image_folder(archive, "test", cache_dir=cache)
    np.testing.assert_array_equal(cached.images, expected.images)
    np.testing.assert_array_equal(cached.labels, expected.labels)


def test_changed_archive_or_unfinished_extraction_is_redone(tmp_path):
    cache = tmp_path / "cache"
    (cache / "tiny-set" / "test" / "junk").mkdir(parents=True)  # left over, no completion marker
    write_image_folder(tmp_path / "v1", seed=1)
    archive = make_archive(tmp_path / "v1", tmp_path / "tiny-set.tar.gz", None)
    v1 = load_image_folder(archive, "test", cache_dir=cache)
    np.testing.assert_array_equal(v1.images, load_image_folder(tmp_path / "v1", "test").images)

    write_image_folder(tmp_path / "v2", seed=2)
    make_archive(tmp_path / "v2", archive, None)
    os.utime(archive, ns=(1, 1))  # a different mtime even on coarse filesystems
    v2 = load_image_folder(archive, "test", cache_dir=cache)
    np.testing.assert_array_equal(v2.images, load_image_folder(tmp_path / "v2", "test").images)
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no staging left behind


@pytest.mark.skipif(
    not SHARED_ARCHIVE.is_file(), reason=f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE} (set HKT_SHARED_DATA)"
)
def test_shared_cifar10_archive_test_split():
    test = load_image_folder(SHARED_ARCHIVE, "test")  # extracts into data/extracted once
    assert test.images.shape == (10_000, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.class_names == CIFAR10_CLASSES
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # Official test image 0 is the first cat; the archive keeps official order within a class.
    lossless = SHARED_DATA / "cifar-samples" / "cifar10_00_3.png"
    if lossless.is_file():
        first_cat = test.images[np.flatnonzero(test.labels == CIFAR10_CLASSES.index("cat"))[0]]
        reference = np.asarray(Image.open(lossless).convert("RGB"))
        assert np.abs(first_cat.astype(int) - reference).mean() < 12  # JPEG q75 noise only


# ---------------------------------------------------------------- cifar pickle


def write_cifar_pickles(directory: Path, name: str, per_file: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Official layout: dicts with bytes keys, 'data' as (N, 3072) CHW rows."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        files = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        label_key, meta, classes = b"labels", ("batches.meta", b"label_names"), 10
    else:
        files = ["train", "test"]
        label_key, meta, classes = b"fine_labels", ("meta", b"fine_label_names"), 100
    directory.mkdir(parents=True)
    written = {}
    for file_name in files:
        images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        content = {
            b"data": images.transpose(0, 3, 1, 2).reshape(per_file, -1),
            label_key: rng.integers(0, classes, per_file).tolist(),
        }
        (directory / file_name).write_bytes(pickle.dumps(content))
        written[file_name] = images
    (directory / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"class{k}".encode() for k in range(classes)]}))
    return written


def test_cifar10_pickles_load_channels_last(tmp_path):
    written = write_cifar_pickles(tmp_path / "cifar-10-batches-py", "cifar10")
    train = load_cifar_pickle("cifar10", "train", tmp_path)  # parent directory works too
    np.testing.assert_array_equal(train.images, np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)]))
    assert train.class_names[3] == "class3"
    config = DataConfig(source="cifar_pickle", path=str(tmp_path / "cifar-10-batches-py"), validation_size=5)
    data = build(config, batch=5)
    assert (data.num_train, data.num_validation, data.num_test, data.num_classes) == (15, 5, 4, 10)


def test_cifar100_pickles_use_fine_labels(tmp_path):
    written = write_cifar_pickles(tmp_path / "cifar-100-python", "cifar100", per_file=6)
    test = load_cifar_pickle("cifar100", "test", tmp_path / "cifar-100-python")
    np.testing.assert_array_equal(test.images, written["test"])
    data = build(DataConfig(source="cifar_pickle", name="cifar100", path=str(tmp_path), validation_size=2), batch=2)
    assert data.num_classes == 100 and data.num_test == 6


# ---------------------------------------------------------------- tfds


def test_tfds_source_reads_records_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        data = build(DataConfig(source="tfds", validation_size=2), batch=4)
        assert (data.num_train, data.num_validation, data.num_test, data.num_classes) == (10, 2, 12, 10)
        assert next(data.train)["image"].shape == (4, 32, 32, 3)


def test_tfds_without_prepared_data_explains_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_tfds("cifar10", "train", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "tfds build cifar10" in message and "data.source" in message


def test_auto_source_prefers_tfds_then_falls_back_to_the_shared_archive(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = DataConfig(source="auto", path=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=4):
        assert resolve_auto_source(config).source == "tfds"

    monkeypatch.setenv("HKT_SHARED_DATA", str(tmp_path / "shared"))
    with pytest.raises(FileNotFoundError, match="data.source='auto' found no data"):
        resolve_auto_source(config)
    write_image_folder(tmp_path / "folder", classes=CIFAR10_CLASSES, per_class=1)
    (tmp_path / "shared" / "cifar10-q75").mkdir(parents=True)
    archive = make_archive(tmp_path / "folder", tmp_path / "shared" / "cifar10-q75" / SHARED_ARCHIVE.name, None)
    resolved = resolve_auto_source(config)
    assert (resolved.source, resolved.path) == ("image_folder", str(archive))


# ---------------------------------------------------------------- errors


def test_missing_directory_names_path_and_config_keys(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="data.path") as error:
        build(DataConfig(source="image_folder", path=str(missing)))
    assert str(missing) in str(error.value) and "data.source" in str(error.value)
    with pytest.raises(FileNotFoundError, match="nowhere.tar.gz"):
        load_image_folder(tmp_path / "nowhere.tar.gz", "train", cache_dir=tmp_path / "cache")


def test_empty_directory_and_folders_without_images_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'train' split directory"):
        load_image_folder(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders") as error:
        load_image_folder(tmp_path, "train")
    assert str(tmp_path / "train") in str(error.value)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="hold no .png/.jpg/.jpeg images"):
        load_image_folder(tmp_path, "train")


def test_corrupt_or_wrongly_sized_image_is_named(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    corrupt = tmp_path / "train" / "apple" / "0001.jpg"
    corrupt.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="unreadable image") as error:
        load_image_folder(tmp_path, "train")
    assert str(corrupt) in str(error.value)
    corrupt.unlink()
    Image.new("RGB", (64, 48)).save(tmp_path / "test" / "mango" / "big.png")
    with pytest.raises(ValueError, match="expected a 32x32 image, got 64x48"):
        load_image_folder(tmp_path, "test")


def test_unknown_class_folder_against_given_class_names(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    with pytest.raises(ValueError, match=r"\['zebra'\] are not in data.class_names"):
        load_image_folder(tmp_path, "train", class_names=("apple", "mango"))


def test_bad_pickles_are_named(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(directory, "cifar10")
    (directory / "data_batch_2").write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle") as error:
        load_cifar_pickle("cifar10", "train", directory)
    assert str(directory / "data_batch_2") in str(error.value)
    (directory / "data_batch_2").write_bytes(pickle.dumps({b"images": [], b"labels": []}))
    with pytest.raises(ValueError, match="expected keys 'data' and 'labels'"):
        load_cifar_pickle("cifar10", "train", directory)
    (directory / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as error:
        load_cifar_pickle("cifar10", "test", directory)
    assert "test_batch" in str(error.value) and "data.path" in str(error.value)


def test_invalid_config_values_name_the_config_key():
    with pytest.raises(ValueError, match="data.source"):
        DataConfig(source="folders")
    with pytest.raises(ValueError, match="data.normalization"):
        DataConfig(normalization="zscore")
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(source="image_folder")
    with pytest.raises(ValueError, match="data.validation_size=200 leaves no training images"):
        build(synthetic(validation_size=200))
