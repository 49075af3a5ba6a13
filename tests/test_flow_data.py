"""Flow data: file formats, RAFT dataset layouts, grain pipelines."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hkt_jax.data import flow_datasets
from hkt_jax.data.flow_augment import AugmentConfig
from hkt_jax.data.flow_io import (
    read_flo,
    read_flow,
    read_kitti_flow,
    read_pfm,
    write_flo,
    write_image,
    write_kitti_flow,
    write_pfm,
)
from hkt_jax.data.flow_pipeline import flow_eval_batches, make_flow_train_iterator
from hkt_jax.data.png16 import read_png, write_png
from hkt_jax.data.synthetic_flow import SyntheticFlow
from tests.conftest import require_shared

# ----------------------------------------------------------------------------- references written here


def reference_read_flo(path) -> np.ndarray:
    """Middlebury's own recipe: float magic, int32 width/height, then u, v interleaved row by row."""
    with open(path, "rb") as f:
        assert np.fromfile(f, np.float32, 1)[0] == np.float32(202021.25)
        width, height = (int(v) for v in np.fromfile(f, np.int32, 2))
        values = np.fromfile(f, np.float32, 2 * width * height)
    return values.reshape(height, width, 2)


# ----------------------------------------------------------------------------- .flo


def test_flo_round_trip_and_layout(tmp_path):
    flow = np.random.default_rng(0).normal(0, 30, (5, 7, 2)).astype(np.float32)
    path = write_flo(tmp_path / "a.flo", flow)
    assert path.stat().st_size == 12 + 5 * 7 * 2 * 4
    np.testing.assert_array_equal(read_flo(path), flow)
    np.testing.assert_array_equal(reference_read_flo(path), flow)


@pytest.mark.parametrize("relative", ["flyingchairs", "sintel-alley1"])
def test_shared_flo_files_match_reference_reader(relative):
    folder = require_shared("flow", relative)
    files = sorted(folder.glob("*.flo"))
    assert files
    for path in files:
        flow, reference = read_flo(path), reference_read_flo(path)
        assert flow.dtype == np.float32 and flow.shape[-1] == 2
        np.testing.assert_array_equal(flow, reference)
        assert np.isfinite(flow).all() and 0 < np.abs(flow).max() < 1000
        frames = [Image.open(p) for p in sorted(folder.iterdir()) if p.suffix in (".ppm", ".png")]
        assert {(f.height, f.width) for f in frames} == {flow.shape[:2]}


def test_flo_bad_magic_and_truncation_are_clear_errors(tmp_path):
    path = write_flo(tmp_path / "a.flo", np.zeros((4, 6, 2), np.float32))
    data = path.read_bytes()
    (tmp_path / "magic.flo").write_bytes(b"PIEX" + data[4:])
    with pytest.raises(ValueError, match=r"magic.flo.*magic"):
        read_flo(tmp_path / "magic.flo")
    (tmp_path / "short.flo").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"short.flo.*6x4.*199 bytes"):
        read_flo(tmp_path / "short.flo")
    (tmp_path / "tiny.flo").write_bytes(data[:7])
    with pytest.raises(ValueError, match="header"):
        read_flo(tmp_path / "tiny.flo")


# ----------------------------------------------------------------------------- KITTI PNG, PNG codec, .pfm


def test_kitti_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    exact = rng.integers(-300 * 64, 300 * 64, (13, 17, 2)) / 64.0  # representable: comes back bit-exact
    valid = rng.random((13, 17)) < 0.6
    flow, mask = read_kitti_flow(write_kitti_flow(tmp_path / "exact.png", exact, valid))
    np.testing.assert_array_equal(flow, exact.astype(np.float32))
    np.testing.assert_array_equal(mask, valid.astype(np.float32))
    assert read_flow(tmp_path / "exact.png")[1] is not None
    arbitrary = rng.uniform(-500, 500, (13, 17, 2))
    flow, mask = read_kitti_flow(write_kitti_flow(tmp_path / "any.png", arbitrary))
    assert np.abs(flow - arbitrary).max() <= 1 / 128 + 1e-6 and mask.all()


def test_png16_decoder_agrees_with_pillow_on_every_filter(tmp_path):
    # A smooth-plus-noise picture makes the writer pick several row filters; Pillow (an independent
    # decoder) reads 16-bit RGB as its high bytes and 16-bit gray in full.
    rng = np.random.default_rng(2)
    ys, xs = np.mgrid[0:40, 0:50]
    image = np.stack([xs * 900 + ys * 7, ys * 1500, (xs * ys * 37) % 65536], -1)
    image[::3] += rng.integers(0, 4000, image[::3].shape)
    image = image.astype(np.uint16)
    path = write_png(tmp_path / "rgb16.png", image)
    data = path.read_bytes()
    (length,) = struct.unpack(">I", data[33:37])
    filters = set(zlib.decompress(data[41 : 41 + length])[:: 50 * 6 + 1])
    assert len(filters) >= 3, filters
    np.testing.assert_array_equal(read_png(path), image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), (image >> 8).astype(np.uint8))
    Image.fromarray(image[..., 0]).save(tmp_path / "gray16.png")  # written by Pillow
    np.testing.assert_array_equal(read_png(tmp_path / "gray16.png")[..., 0], image[..., 0])
    rgb8 = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "rgb8.png", optimize=True)
    np.testing.assert_array_equal(read_png(tmp_path / "rgb8.png"), rgb8)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png.*truncated"):
        read_png(tmp_path / "cut.png")


def test_pfm_byte_order_and_bottom_up_rows(tmp_path):
    values = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) - 4.5
    # Written by hand: big-endian (positive scale), bottom row first.
    (tmp_path / "big.pfm").write_bytes(b"PF\n3 2\n1.0\n" + values[::-1].astype(">f4").tobytes())
    np.testing.assert_array_equal(read_pfm(tmp_path / "big.pfm"), values)
    (tmp_path / "gray.pfm").write_bytes(b"Pf\n3 2\n-1.0\n" + values[::-1, :, 0].astype("<f4").tobytes())
    np.testing.assert_array_equal(read_pfm(tmp_path / "gray.pfm"), values[..., 0])
    for little_endian in (True, False):
        path = write_pfm(tmp_path / f"w{little_endian}.pfm", values, little_endian=little_endian)
        np.testing.assert_array_equal(read_pfm(path), values)
    flow, valid = read_flow(tmp_path / "big.pfm")
    np.testing.assert_array_equal(flow, values[..., :2])
    assert valid is None
    (tmp_path / "bad.pfm").write_bytes(b"P6\n3 2\n255\n" + bytes(18))
    with pytest.raises(ValueError, match="bad.pfm.*not a .pfm"):
        read_pfm(tmp_path / "bad.pfm")
    (tmp_path / "cut.pfm").write_bytes(b"PF\n3 2\n-1.0\n" + bytes(20))
    with pytest.raises(ValueError, match="cut.pfm"):
        read_pfm(tmp_path / "cut.pfm")


# ----------------------------------------------------------------------------- dataset layouts

SIZE = (8, 12)  # tiny frames: the layouts are what is tested


def frame(path, value: int):
    return write_image(path, np.full(SIZE + (3,), value, np.uint8))


def constant_flow(value: float) -> np.ndarray:
    return np.full(SIZE + (2,), value, np.float32)


def test_flying_chairs_layout_and_split(tmp_path):
    data = tmp_path / "FlyingChairs_release" / "data"
    for i in range(3):
        frame(data / f"{i + 1:05d}_img1.ppm", 10 * i)
        frame(data / f"{i + 1:05d}_img2.ppm", 10 * i + 5)
        write_flo(data / f"{i + 1:05d}_flow.flo", constant_flow(i))
    with pytest.raises(ValueError, match=r"chairs_split.txt.*Expected layout: FlyingChairs_release/data"):
        flow_datasets.flying_chairs(tmp_path / "FlyingChairs_release")
    (tmp_path / "FlyingChairs_release" / "chairs_split.txt").write_text("1\n2\n1\n")
    train = flow_datasets.flying_chairs(tmp_path / "FlyingChairs_release")
    validation = flow_datasets.flying_chairs(data, split="validation")
    assert len(train) == 2 and len(validation) == 1
    sample = train[1]
    assert sample["image1"][0, 0, 0] == 20 and sample["image2"][0, 0, 0] == 25
    np.testing.assert_array_equal(sample["flow"], constant_flow(2))
    assert sample["valid"].all() and validation[0]["flow"][0, 0, 0] == 1
    (data / "00003_img2.ppm").unlink()
    with pytest.raises(ValueError, match=r"found 5 .ppm frames for 3 .flo"):
        flow_datasets.flying_chairs(data)


def test_flying_things_both_directions(tmp_path):
    root = tmp_path / "FlyingThings3D"
    scene = ("A", "0000")
    for i, number in enumerate((6, 7, 8)):
        frame(root / "frames_cleanpass" / "TRAIN" / scene[0] / scene[1] / "left" / f"{number:04d}.png", i)
        for direction, sign in (("into_future", 1), ("into_past", -1)):
            values = np.zeros(SIZE + (3,), np.float32)
            values[..., 0], values[..., 1] = sign * number, 0.5
            name = f"OpticalFlowInto{'Future' if sign > 0 else 'Past'}_{number:04d}_L.pfm"
            write_pfm(root / "optical_flow" / "TRAIN" / scene[0] / scene[1] / direction / "left" / name, values)
    things = flow_datasets.flying_things(root)
    assert len(things) == 4 and things.image_pairs[0][0].name == "0006.png"
    future, past = things[0], things[2]
    assert (future["image1"][0, 0, 0], future["image2"][0, 0, 0], future["flow"][0, 0, 0]) == (0, 1, 6)
    assert (past["image1"][0, 0, 0], past["image2"][0, 0, 0], past["flow"][0, 0, 0]) == (1, 0, -7)
    assert future["flow"].shape == SIZE + (2,)
    with pytest.raises(ValueError, match=r"frames_finalpass.*Expected layout: FlyingThings3D"):
        flow_datasets.flying_things(root, pass_name="final")


def test_sintel_training_and_test(tmp_path):
    root = tmp_path / "Sintel"
    for split in ("training", "test"):
        for i in range(1, 4):
            frame(root / split / "clean" / "alley_1" / f"frame_{i:04d}.png", i)
    for i in range(1, 3):
        write_flo(root / "training" / "flow" / "alley_1" / f"frame_{i:04d}.flo", constant_flow(i))
    train, test = flow_datasets.sintel(root), flow_datasets.sintel(root, split="test")
    assert len(train) == len(test) == 2
    assert train[1]["image1"][0, 0, 0] == 2 and train[1]["flow"][0, 0, 0] == 2 and train[1]["valid"].all()
    assert not test[0]["valid"].any()
    with pytest.raises(ValueError, match=r"Sintel/training/final.*Expected layout: Sintel"):
        flow_datasets.sintel(root, pass_name="final")
    (root / "training" / "flow" / "alley_1" / "frame_0002.flo").unlink()
    with pytest.raises(ValueError, match="1 .flo flows for 3 frames"):
        flow_datasets.sintel(root)


def test_kitti_and_hd1k_sparse_layouts(tmp_path):
    valid = np.zeros(SIZE, bool)
    valid[2:5, 3:9] = True
    kitti_root = tmp_path / "KITTI"
    for i in range(2):
        for split in ("training", "testing"):
            frame(kitti_root / split / "image_2" / f"{i:06d}_10.png", i)
            frame(kitti_root / split / "image_2" / f"{i:06d}_11.png", i + 100)
        write_kitti_flow(kitti_root / "training" / "flow_occ" / f"{i:06d}_10.png", constant_flow(i + 0.25), valid)
    kitti = flow_datasets.kitti(kitti_root)
    assert kitti.sparse and len(kitti) == 2 and len(flow_datasets.kitti(kitti_root, "testing")) == 2
    sample = kitti[1]
    assert sample["image2"][0, 0, 0] == 101 and sample["flow"][3, 4, 0] == 1.25
    np.testing.assert_array_equal(sample["valid"], valid.astype(np.float32))

    hd1k_root = tmp_path / "HD1K"
    for sequence in range(2):
        for i in range(3):
            frame(hd1k_root / "hd1k_input" / "image_2" / f"{sequence:06d}_{i:04d}.png", i)
            write_kitti_flow(
                hd1k_root / "hd1k_flow_gt" / "flow_occ" / f"{sequence:06d}_{i:04d}.png", constant_flow(i), valid
            )
    hd1k = flow_datasets.hd1k(hd1k_root)
    assert hd1k.sparse and len(hd1k) == 4 and hd1k[3]["flow"][3, 4, 1] == 1
    with pytest.raises(ValueError, match=r"nowhere/training/image_2.*Expected layout: KITTI"):
        flow_datasets.kitti(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"hd1k_input.*Expected layout: HD1K"):
        flow_datasets.hd1k(tmp_path / "KITTI")


def test_shared_folders_and_unknown_names(tmp_path):
    chairs = flow_datasets.open_flow_dataset("folder", require_shared("flow", "flyingchairs"))
    sintel = flow_datasets.flow_folder(require_shared("flow", "sintel-alley1"))
    assert len(chairs) == 3 and len(sintel) == 1
    assert chairs[2]["image1"].shape == (384, 512, 3) and sintel[0]["flow"].shape == (436, 1024, 2)
    assert [p[0].name for p in chairs.image_pairs] == [f"000000{i}-img0.ppm" for i in range(3)]
    frame(tmp_path / "lonely.png", 1)
    with pytest.raises(ValueError, match="no frame pair with a flow file"):
        flow_datasets.flow_folder(tmp_path)
    with pytest.raises(ValueError, match="unknown flow dataset"):
        flow_datasets.open_flow_dataset("middlebury", tmp_path)


# ----------------------------------------------------------------------------- grain pipelines


def test_flow_train_iterator_resumes_exactly_and_splits_by_process():
    source = SyntheticFlow(10, 32, 32)
    config = AugmentConfig(crop_size=(24, 24), eraser_size=(4, 8))

    def build(**kw):
        return make_flow_train_iterator(source, config, global_batch_size=4, seed=3, num_threads=1, **kw)

    whole = build()
    first = [next(whole) for _ in range(3)]
    assert {k: v.shape for k, v in first[0].items()} == {
        "image1": (4, 24, 24, 3),
        "image2": (4, 24, 24, 3),
        "flow": (4, 24, 24, 2),
        "valid": (4, 24, 24),
    }
    state = whole.get_state()
    expected = next(whole)
    resumed = build()
    resumed.set_state(state)
    for key, value in next(resumed).items():
        np.testing.assert_array_equal(value, expected[key])
    halves = [next(build(process_index=p, process_count=2)) for p in range(2)]
    for key in expected:
        np.testing.assert_array_equal(np.concatenate([half[key] for half in halves]), first[0][key])
    other = make_flow_train_iterator(source, config, global_batch_size=4, seed=4, num_threads=1)
    with pytest.raises(ValueError, match="resuming would give different batches"):
        other.set_state(state)


def test_flow_eval_batches_pad_like_raft():
    source = SyntheticFlow(3, 40, 56)

    class Cropped:  # 36 x 50 frames: padded to 40 x 56
        def __len__(self):
            return len(source)

        def __getitem__(self, index):
            return {k: v[:36, :50] for k, v in source[index].items()}

    batches = list(flow_eval_batches(Cropped(), global_batch_size=2, pad_mode="sintel"))
    assert len(batches) == 2 and batches[0]["image1"].shape == (2, 40, 56, 3)
    np.testing.assert_array_equal(batches[1]["mask"], [1, 0])
    np.testing.assert_array_equal(batches[0]["region"][0], [2, 3, 36, 50])
    np.testing.assert_array_equal(batches[0]["image1"][0, 2:38, 3:53], Cropped()[0]["image1"])
    assert batches[0]["valid"][0].sum() == Cropped()[0]["valid"].sum() and not batches[1]["valid"][1].any()
    kitti = next(flow_eval_batches(Cropped(), pad_mode="kitti"))
    np.testing.assert_array_equal(kitti["region"][0], [0, 3, 36, 50])
