"""``data.source`` of a segmentation run: lits, png_folder, image_folder (either) and synthetic; a folder that
does not hold the named layout is an error naming the folder and the layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hkt_jax.data.synthetic_ct import SyntheticCTConfig, write_synthetic_lits
from hkt_jax.tasks.segmentation import SegDataConfig, SegSettings, load_slices

SETTINGS = SegSettings(num_classes=3)


@pytest.fixture(scope="module")
def png_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("png_pairs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(rng.integers(0, 3, (16, 16), dtype=np.uint8)).save(root / "masks" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def lits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lits")
    write_synthetic_lits(root, 2, seed=0, config=SyntheticCTConfig(shape=(32, 32, 4)), compress=False)
    return root


def test_png_folder_and_image_folder_read_png_pairs(png_root):
    for source in ("png_folder", "image_folder"):
        slices = load_slices(SegDataConfig(source=source, path=str(png_root)), SETTINGS)
        assert slices.images.shape[:3] == (3, 16, 16)
        expected = np.asarray(Image.open(png_root / "masks" / "b.png"))
        np.testing.assert_array_equal(slices.masks[1], expected)


def test_lits_and_image_folder_read_nifti_cases(lits_root):
    for source in ("lits", "image_folder"):
        slices = load_slices(SegDataConfig(source=source, path=str(lits_root)), SETTINGS)
        assert slices.images.shape[:3] == (8, 32, 32)  # 2 volumes x 4 axial slices


def test_a_folder_without_the_named_layout_is_an_error_naming_it(png_root, lits_root):
    with pytest.raises(ValueError, match=rf"{lits_root}.*images/NAME.png"):
        load_slices(SegDataConfig(source="png_folder", path=str(lits_root)), SETTINGS)
    with pytest.raises(ValueError, match=rf"{png_root}.*volume-N"):  # lits never falls back to PNG pairs
        load_slices(SegDataConfig(source="lits", path=str(png_root)), SETTINGS)


def test_sources_are_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="a segmentation run reads one of"):
        SegDataConfig(source="tfds")
    with pytest.raises(ValueError, match="needs data.path.*segmentation-N"):
        SegDataConfig(source="lits")
    SegDataConfig(source="synthetic")  # no path needed
