"""Segmentation data: NIfTI round trip, preprocessing vs NumPy/JAX, by-volume split, bad inputs, streams."""

from __future__ import annotations

import gzip

import grain
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hkt_jax.data import volumes
from hkt_jax.data.synthetic_ct import SyntheticCTConfig, synthetic_case, write_nifti, write_synthetic_lits

CONFIG = SyntheticCTConfig(shape=(32, 32, 8))


@pytest.fixture(scope="module")
def lits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lits")
    write_synthetic_lits(root, 5, seed=3, config=CONFIG)
    return root


def test_nifti_round_trip_keeps_affine_labels_and_hu(lits_dir, tmp_path):
    cases = volumes.find_lits_cases(lits_dir)
    assert [c.case_id for c in cases] == ["0", "1", "2", "3", "4"]
    for number, case in enumerate(cases):
        volume, labels, affine = synthetic_case(np.random.default_rng([3, number]), CONFIG)
        hu, mask, read_affine = volumes.load_case(case)
        np.testing.assert_array_equal(read_affine, affine)
        np.testing.assert_array_equal(mask, labels)
        np.testing.assert_array_equal(hu, volume.astype(np.float32))
        assert nib.load(str(case.image_path)).header.get_data_dtype() == np.int16
    assert {int(np.unique(volumes.load_case(c)[1]).max()) for c in cases} == {1, 2}  # some cases have tumours
    # Uncompressed .nii reads the same.
    volume, labels, affine = synthetic_case(np.random.default_rng(0), CONFIG)
    write_nifti(tmp_path / "volume-7.nii", volume, affine)
    write_nifti(tmp_path / "segmentation-7.nii", labels, affine)
    hu, mask, read_affine = volumes.load_case(volumes.find_lits_cases(tmp_path)[0])
    np.testing.assert_array_equal(read_affine, affine)
    np.testing.assert_array_equal(mask, labels)


def test_hu_window_and_resizes_match_numpy_and_jax():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100, 1500, size=(3, 12, 10))
    expected = (np.minimum(np.maximum(hu, -200.0), 250.0) + 200.0) / 450.0
    np.testing.assert_allclose(volumes.window_hu(hu), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(volumes.window_hu(hu, (-100, 100)), np.clip((hu + 100) / 200, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="high > low"):
        volumes.window_hu(hu, (10, 10))

    images = rng.random((3, 12, 10)).astype(np.float32)
    halved = images.reshape(3, 6, 2, 5, 2).mean(axis=(2, 4))  # exact 2x reduction = 2x2 block means
    np.testing.assert_allclose(volumes.resize_linear(images, (6, 5)), halved, rtol=1e-6)
    for size in ((17, 7), (24, 20), (5, 13)):
        reference = jax.image.resize(
            jnp.asarray(images, jnp.float64 if jax.config.x64_enabled else jnp.float32),
            (3, *size),
            "linear",
            antialias=False,
        )
        np.testing.assert_allclose(volumes.resize_linear(images, size), reference, atol=1e-5)
        labels = rng.integers(0, 3, size=(3, 12, 10))
        reference = jax.image.resize(jnp.asarray(labels, jnp.float32), (3, *size), "nearest")
        np.testing.assert_array_equal(volumes.resize_nearest(labels, size), np.asarray(reference).astype(int))
    labels = rng.integers(0, 3, size=(12, 10))
    np.testing.assert_array_equal(volumes.resize_nearest(labels, (6, 5)), labels[1::2, 1::2])


def test_volume_slices_and_back():
    hu = np.random.default_rng(1).uniform(-500, 500, size=(16, 12, 5))
    slices = volumes.volume_to_slices(hu, size=(8, 6))
    assert slices.shape == (5, 8, 6, 1)
    np.testing.assert_allclose(slices[2, ..., 0], volumes.resize_linear(volumes.window_hu(hu[:, :, 2]), (8, 6)))
    labels = np.kron(np.random.default_rng(2).integers(0, 3, size=(5, 8, 6)), np.ones((1, 2, 2), int))
    back = volumes.slices_to_volume(volumes.resize_nearest(labels, (8, 6)), (16, 12, 5))
    np.testing.assert_array_equal(back, np.moveaxis(labels, 0, -1))  # blocky labels survive the round trip


def test_split_by_volume_never_shares_a_volume(lits_dir):
    cases = volumes.find_lits_cases(lits_dir)
    slice_set = volumes.load_lits_slices(cases, size=16)
    assert slice_set.images.shape == (40, 16, 16, 1) and slice_set.masks.shape == (40, 16, 16)
    for seed in range(5):
        train_ids, val_ids = volumes.split_by_case(slice_set.case_ids, 0.4, seed=seed)
        assert len(val_ids) == 2 and set(train_ids) | set(val_ids) == set(slice_set.case_ids)
        train, val = volumes.select_cases(slice_set, train_ids), volumes.select_cases(slice_set, val_ids)
        assert not set(train_ids) & set(val_ids)
        assert len(train) + len(val) == len(slice_set)
        # The validation slices are exactly the slices of the validation volumes, read again from disk.
        for position, case_id in enumerate(val.case_ids):
            hu, labels, _ = volumes.load_case(cases[int(case_id)])
            rows = val.case_index == position
            np.testing.assert_array_equal(val.masks[rows], volumes.resize_nearest(np.moveaxis(labels, -1, 0), (16, 16)))
            np.testing.assert_allclose(val.images[rows], volumes.volume_to_slices(hu, size=16), atol=1e-6)
        train_rows = {tuple(m.ravel()) for m in train.images[..., 0].round(5)}
        assert not any(tuple(m.ravel()) in train_rows for m in val.images[..., 0].round(5))
    with pytest.raises(ValueError, match="no training case"):
        volumes.split_by_case(slice_set.case_ids, 5)


def _write_case(root, number, volume, labels, affine, mask_affine=None):
    write_nifti(root / f"volume-{number}.nii.gz", volume, affine)
    write_nifti(root / f"segmentation-{number}.nii.gz", labels, affine if mask_affine is None else mask_affine)
    return volumes.Case(str(number), root / f"volume-{number}.nii.gz", root / f"segmentation-{number}.nii.gz")


def test_bad_inputs_are_errors_naming_the_file(tmp_path):
    volume, labels, affine = synthetic_case(np.random.default_rng(0), CONFIG)
    case = _write_case(tmp_path, 1, volume, labels[:, :, :-1], affine)
    with pytest.raises(ValueError, match="segmentation-1.nii.gz: shape"):
        volumes.load_case(case)
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    case = _write_case(tmp_path, 2, volume, labels, affine, shifted)
    with pytest.raises(ValueError, match="segmentation-2.nii.gz: affine differs"):
        volumes.load_case(case)
    out_of_range = labels.copy()
    out_of_range[0, 0, 0] = 3
    case = _write_case(tmp_path, 3, volume, out_of_range, affine)
    with pytest.raises(ValueError, match=r"segmentation-3.nii.gz: labels \[3\]"):
        volumes.load_case(case)
    case = _write_case(tmp_path, 4, volume, labels.astype(np.float32) * 0.5, affine)
    with pytest.raises(ValueError, match=r"segmentation-4.nii.gz: labels \[0.5\]"):
        volumes.load_case(case)
    (tmp_path / "volume-5.nii.gz").write_bytes(gzip.compress(b"not a nifti file"))
    with pytest.raises(ValueError, match="volume-5.nii.gz: cannot read"):
        volumes.read_nifti(tmp_path / "volume-5.nii.gz")
    write_nifti(tmp_path / "volume-6.nii.gz", volume[:, :, 0], affine)
    with pytest.raises(ValueError, match="volume-6.nii.gz: expected a 3D"):
        volumes.read_nifti(tmp_path / "volume-6.nii.gz")
    (tmp_path / "segmentation-5.nii.gz").write_bytes(b"")
    (tmp_path / "segmentation-6.nii.gz").write_bytes(b"")
    write_nifti(tmp_path / "volume-9.nii", volume, affine)
    with pytest.raises(ValueError, match="volume-9.nii: no segmentation-9"):
        volumes.find_lits_cases(tmp_path)


def _toy_slices(count=20, size=8, seed=0):
    """Image = mask / 2, so any mismatch between image and mask augmentation shows."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size, size), np.uint8)
    for i in range(0, count, 4):  # one slice in four has foreground, placed off-centre
        masks[i, 1:4, 2:7] = 1
        masks[i, 2, 3] = 2
    masks[1, 0, 0] = 0
    images = (masks / 2.0)[..., None].astype(np.float32)
    return volumes.SliceSet(
        images, masks, np.repeat(np.arange(count // 5), 5).astype(np.int32), tuple(str(c) for c in range(count // 5)), 3
    ), rng


def test_train_stream_samples_foreground_augments_consistently_and_resumes_exactly():
    slice_set, _ = _toy_slices()
    stream = volumes.make_train_stream(slice_set, global_batch_size=16, seed=5, foreground_fraction=0.75)
    first = [next(stream) for _ in range(3)]
    state = stream.get_state()
    expected = [next(stream) for _ in range(2)]
    resumed = volumes.make_train_stream(slice_set, global_batch_size=16, seed=5, foreground_fraction=0.75)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(2)]):
        for key in ("image", "mask", "case"):
            np.testing.assert_array_equal(a[key], b[key])
    batch = first[0]
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (16, 8, 8) and batch["mask"].dtype == np.int32
    everything = first + expected
    np.testing.assert_array_equal(
        np.concatenate([b["image"][..., 0] for b in everything]), np.concatenate([b["mask"] for b in everything]) / 2.0
    )
    foreground = np.mean([b["mask"][i].max() > 0 for b in everything for i in range(16)])
    assert 0.55 < foreground < 0.95  # 75% asked; uniform sampling would give 25%
    originals = {slice_set.masks[i].tobytes() for i in range(len(slice_set))}
    assert any(m.astype(np.uint8).tobytes() not in originals for b in everything for m in b["mask"])  # augmented
    other = volumes.make_train_stream(slice_set, global_batch_size=16, seed=6, foreground_fraction=0.75)
    assert not np.array_equal(next(other)["mask"], first[0]["mask"])
    with pytest.raises(ValueError, match="resuming would give different batches"):
        other.set_state(state)
    # Two processes split each global batch between them.
    halves = [
        next(
            volumes.make_train_stream(
                slice_set, global_batch_size=16, seed=5, foreground_fraction=0.75, process_index=p, process_count=2
            )
        )
        for p in (0, 1)
    ]
    np.testing.assert_array_equal(np.concatenate([h["mask"] for h in halves]), first[0]["mask"])


def test_sampling_probabilities():
    has_fg = np.array([True, False, False, False, True])
    p = volumes.sampling_probabilities(has_fg, 0.8)
    np.testing.assert_allclose(p, [0.4, 0.2 / 3, 0.2 / 3, 0.2 / 3, 0.4])
    np.testing.assert_allclose(volumes.sampling_probabilities(has_fg, None), 0.2)
    np.testing.assert_allclose(volumes.sampling_probabilities(np.zeros(4, bool), 0.8), 0.25)


def test_eval_batches_cover_every_slice_once_with_padding():
    slice_set, _ = _toy_slices(count=20)
    batches = list(volumes.eval_batches(slice_set, global_batch_size=8))
    assert len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    assert valid.sum() == 20 and not valid[20:].any()
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches])[valid], slice_set.masks)
    np.testing.assert_array_equal(np.concatenate([b["case"] for b in batches])[valid], slice_set.case_index)
    source = grain.MapDataset.source(slice_set)  # the SliceSet is a random-access grain source
    np.testing.assert_array_equal(source[3]["mask"], slice_set.masks[3])


def test_png_pairs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 8, 12), dtype=np.uint8)
    labels = rng.integers(0, 2, size=(3, 8, 12), dtype=np.uint8)
    for i in range(3):
        Image.fromarray(pixels[i]).save(tmp_path / "images" / f"img{i}.png")
        Image.fromarray(labels[i]).save(tmp_path / "masks" / f"img{i}.png")
    slice_set = volumes.load_png_pairs(tmp_path, num_classes=2)
    np.testing.assert_allclose(slice_set.images[..., 0], pixels / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(slice_set.masks, labels)
    assert slice_set.case_ids == ("img0", "img1", "img2")
    assert volumes.load_png_pairs(tmp_path, num_classes=2, size=(4, 6)).images.shape == (3, 4, 6, 1)
    with pytest.raises(ValueError, match=r"img0.png: labels \[1\]"):
        volumes.load_png_pairs(tmp_path, num_classes=1)
    Image.fromarray(pixels[0]).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(ValueError, match="lonely.png: no mask"):
        volumes.load_png_pairs(tmp_path, num_classes=2)
