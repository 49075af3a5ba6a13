"""Flow augmentation and synthetic pairs: warping frame 2 by the flow must give back frame 1."""

from __future__ import annotations

import numpy as np
import pytest

from hkt_jax.data.flow_augment import (
    AugmentConfig,
    SpatialParams,
    adjust_colors,
    apply_spatial,
    augment,
    raft_augment_config,
)
from hkt_jax.data.synthetic_flow import SyntheticFlow


def backward_warp(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sample of ``image`` at ``x + flow(x)``, and where that point is inside the frame."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    x, y = xs + flow[..., 0].astype(np.float64), ys + flow[..., 1].astype(np.float64)
    inside = (x >= 0) & (y >= 0) & (x <= width - 1) & (y <= height - 1)
    x0 = np.clip(np.floor(x), 0, width - 2).astype(int)
    y0 = np.clip(np.floor(y), 0, height - 2).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    image = image.astype(np.float64)
    warped = (
        image[y0, x0] * (1 - fx) * (1 - fy)
        + image[y0, x0 + 1] * fx * (1 - fy)
        + image[y0 + 1, x0] * (1 - fx) * fy
        + image[y0 + 1, x0 + 1] * fx * fy
    )
    return warped, inside


def smooth_flow(flow: np.ndarray, tolerance: float = 0.5) -> np.ndarray:
    """Pixels whose 3x3 neighbours move alike (away from motion boundaries)."""
    padded = np.pad(flow, ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = flow.shape[:2]
    ok = np.ones((height, width), bool)
    for dy in range(3):
        for dx in range(3):
            ok &= np.abs(padded[dy : dy + height, dx : dx + width] - flow).max(-1) < tolerance
    return ok


def warp_errors(sample: dict[str, np.ndarray], flow: np.ndarray | None = None) -> np.ndarray:
    """|frame2 warped by the flow - frame1| (max over channels) at valid, in-frame, smooth pixels."""
    flow = sample["flow"] if flow is None else flow
    warped, inside = backward_warp(sample["image2"], flow)
    where = (sample["valid"] > 0) & inside & smooth_flow(sample["flow"])
    return np.abs(warped - sample["image1"]).max(-1)[where]


# ----------------------------------------------------------------------------- synthetic generator


def bilinear_error_bound(source: SyntheticFlow, index: int) -> float:
    """Bilinear interpolation error bound, (|g_xx| + |g_yy|) / 8, of the scene's textures in frame 2.

    A texture ``sum_k w_k cos(2 pi f_k . p)`` seen through ``p = A^-1 x`` has frequencies ``A^-T f_k``.
    """
    bounds = []
    for layer in source.layers(index):
        frequencies = layer.frequencies @ np.linalg.inv(layer.matrix)
        curvature = (2 * np.pi * np.linalg.norm(frequencies, axis=1)) ** 2 / 8
        bounds.append((np.abs(layer.color_weights) * curvature[:, None]).sum(axis=0).max())
    return max(bounds)


def test_synthetic_pairs_are_warp_consistent_at_valid_pixels():
    source = SyntheticFlow(6, 64, 64, seed=3)
    for index in range(len(source)):
        sample = source[index]
        assert sample["image1"].dtype == np.float32 and sample["flow"].shape == (64, 64, 2)
        warped, inside = backward_warp(sample["image2"], sample["flow"])
        valid = sample["valid"] > 0
        assert 0.4 < valid.mean() < 0.99 and inside[valid].all()
        error = np.abs(warped - sample["image1"]).max(-1)
        assert error[valid].max() <= bilinear_error_bound(source, index) + 0.01
        assert error[valid].mean() < 1.5
        assert error[~valid & inside].mean() > 5 * error[valid].mean()  # the mask does exclude occlusions
        assert np.abs(sample["flow"]).max() > 1.0


def test_synthetic_is_deterministic_per_seed_and_index():
    first, again, other = SyntheticFlow(4, 32, 48, seed=7), SyntheticFlow(4, 32, 48, seed=7), SyntheticFlow(4, 32, 48)
    a3 = first[3]
    _ = again[1]
    for key, value in again[3].items():
        np.testing.assert_array_equal(value, a3[key])
    assert a3["image1"].shape == (32, 48, 3)
    assert not np.array_equal(other[3]["image1"], a3["image1"])
    assert not np.array_equal(first[2]["flow"], a3["flow"])
    with pytest.raises(ValueError, match="multiples of 8"):
        SyntheticFlow(4, 30, 48)
    with pytest.raises(IndexError):
        first[4]


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize(
    "params",
    [
        SpatialParams(crop_y=7, crop_x=11),
        SpatialParams(h_flip=True, crop_y=3, crop_x=4),
        SpatialParams(v_flip=True, crop_y=3, crop_x=4),
        SpatialParams(1.3, 1.3, resize=True, crop_y=5, crop_x=9),
        SpatialParams(1.25, 0.85, resize=True, crop_y=2, crop_x=3),
        SpatialParams(0.8, 0.8, resize=True, crop_y=1, crop_x=2),
        SpatialParams(1.6, 1.2, True, True, True, crop_y=10, crop_x=20),
    ],
    ids=["crop", "hflip", "vflip", "zoom", "stretch", "shrink", "all"],
)
def test_spatial_augmentation_keeps_frames_and_flow_consistent(params):
    source, config = SyntheticFlow(4, 64, 64, seed=11), AugmentConfig(crop_size=(48, 48))
    errors, wrong = [], []
    for index in range(len(source)):
        out = apply_spatial(source[index], params, config)
        assert out["image1"].shape == (48, 48, 3) and out["flow"].shape == (48, 48, 2)
        errors.append(warp_errors(out))
        # The same frames with the flow left unscaled / unflipped / shifted must not fit.
        undone = out["flow"] / np.float32([params.scale_x, params.scale_y])
        undone *= np.float32([-1 if params.h_flip else 1, -1 if params.v_flip else 1])
        wrong.append(warp_errors(out, undone if (params.resize or params.h_flip or params.v_flip) else undone + 1.5))
    errors, wrong = np.concatenate(errors), np.concatenate(wrong)
    assert errors.size > 3000
    assert errors.mean() < 1.6 and np.percentile(errors, 95) < 4.5, (errors.mean(), np.percentile(errors, 95))
    if not params.resize:  # no resampling of frame 1: every valid pixel is within interpolation error
        assert errors.max() < 5.0
    assert wrong.mean() > 3 * errors.mean()


def test_full_augmentation_without_photometrics_is_consistent_and_seeded():
    source = SyntheticFlow(3, 64, 64, seed=5)
    config = AugmentConfig(crop_size=(40, 48), photometric=False, eraser_prob=0.0, min_scale=-0.3, max_scale=0.4)
    errors = []
    for seed in range(6):
        out = augment(source[seed % 3], np.random.default_rng(seed), config)
        errors.append(warp_errors(out))
        again = augment(source[seed % 3], np.random.default_rng(seed), config)
        for key in out:
            np.testing.assert_array_equal(out[key], again[key])
    errors = np.concatenate(errors)
    assert errors.mean() < 1.6 and np.percentile(errors, 95) < 4.5


def test_sparse_augmentation_moves_points_with_their_flow():
    # The flow of each valid point encodes where it came from, so the moved points can be checked exactly.
    height, width, scale = 40, 56, 1.37
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    valid = (np.random.default_rng(0).random((height, width)) < 0.3).astype(np.float32)
    sample = {
        "image1": np.zeros((height, width, 3), np.float32),
        "image2": np.zeros((height, width, 3), np.float32),
        "flow": np.stack([xs, ys], -1),
        "valid": valid,
    }
    config = raft_augment_config("kitti", (32, 40))
    out = apply_spatial(sample, SpatialParams(scale, scale, resize=True, crop_y=6, crop_x=9), config)
    new_y, new_x = np.nonzero(out["valid"])
    source_x, source_y = (out["flow"][new_y, new_x] / scale).T
    np.testing.assert_allclose(source_x, np.rint(source_x), atol=1e-4)  # a value of one point, not a blend
    assert valid[np.rint(source_y).astype(int), np.rint(source_x).astype(int)].all()
    np.testing.assert_array_equal(np.rint((source_x + 0.5) * scale - 0.5) - 9, new_x)
    np.testing.assert_array_equal(np.rint((source_y + 0.5) * scale - 0.5) - 6, new_y)
    assert abs(out["valid"].mean() - valid.mean() / scale**2) < 0.05

    # On a synthetic pair: warping frame 2 by the sparse flow reproduces frame 1 at the kept points.
    errors, unscaled = [], []
    for index, dense in enumerate(SyntheticFlow(3, 64, 64, seed=9)):
        dense["valid"] *= np.random.default_rng(index).random((64, 64)) < 0.5
        moved = apply_spatial(dense, SpatialParams(1.3, 1.3, resize=True, crop_y=4, crop_x=8), config)
        kept = moved["valid"] > 0
        for flow, into in ((moved["flow"], errors), (moved["flow"] / 1.3, unscaled)):
            warped, inside = backward_warp(moved["image2"], flow)
            into.append(np.abs(warped - moved["image1"]).max(-1)[kept & inside])
    errors, unscaled = np.concatenate(errors), np.concatenate(unscaled)
    assert errors.size > 600 and np.median(errors) < 1.0 and np.percentile(errors, 90) < 4.0
    assert unscaled.mean() > 2 * errors.mean()


def test_color_adjustments_match_torchvision():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("torchvision.transforms.functional")
    rng = np.random.default_rng(4)
    pair = rng.uniform(0, 255, (2, 12, 16, 3)).astype(np.float32)
    # RAFT jitters both frames as one picture stacked along the height.
    picture = torch.from_numpy(np.concatenate(list(pair), axis=0) / 255.0).permute(2, 0, 1)
    steps = [
        lambda x: functional.adjust_brightness(x, 1.2),
        lambda x: functional.adjust_contrast(x, 0.7),
        lambda x: functional.adjust_saturation(x, 1.3),
        lambda x: functional.adjust_hue(x, -0.12),
    ]
    order = [2, 0, 3, 1]
    for step in order:
        picture = steps[step](picture)
    reference = picture.permute(1, 2, 0).numpy().reshape(2, 12, 16, 3) * 255.0
    ours = adjust_colors(pair, order, 1.2, 0.7, 1.3, -0.12)
    np.testing.assert_allclose(ours, reference, atol=0.1)  # PIL's gray weights 0.299 vs torchvision's 0.2989
