"""RAFT / RAFT-S against the flows princeton-vl's own code computed (shared data ``raft-reference``).

The references are random-weight princeton-vl checkpoints and the encoder outputs and
flows its ``core/raft.py`` produced with them (README in the data folder). CPU budget:
each (size, corr option) is jitted once for the three FlyingChairs pairs as one batch;
the Sintel-size pair (440x1024) runs with the all-pairs volume only; the on-the-fly
option is checked on the three chairs pairs (and equal to all-pairs window by window).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="reading the reference .pth checkpoints needs PyTorch (requirements-test.txt)")

from hkt_jax.convert import raft_from_torch  # noqa: E402
from hkt_jax.data.flow_io import read_image  # noqa: E402
from hkt_jax.models import RAFT  # noqa: E402
from hkt_jax.models.raft_corr import build_corr, lookup_corr  # noqa: E402
from hkt_jax.engine.stages import run_all_stages  # noqa: E402
from tests.conftest import require_shared  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs

SIZES = ("large", "small")
CHAIRS = ("chairs0", "chairs1", "chairs2")
MAX_ENCODER_REL_ERROR = 1e-4
MAX_MEAN_EPE_DIFF, MAX_EPE_DIFF = 1e-3, 1e-2


@pytest.fixture(scope="module")
def reference():
    return np.load(require_shared("raft-reference", "reference_flows_seed0.npz"))


@pytest.fixture(scope="module")
def variables():
    return {size: raft_from_torch(require_shared("raft-reference", f"raft-{size}-seed0.pth")) for size in SIZES}


def sintel_padded() -> tuple[np.ndarray, np.ndarray]:
    """The Sintel pair, 436 -> 440 rows by replicating 2 at the top and 2 at the bottom (as the reference)."""
    frames = [read_image(require_shared("flow", "sintel-alley1", f"frame_000{i}.png")) for i in (1, 2)]
    return tuple(np.pad(f, ((2, 2), (0, 0), (0, 0)), mode="edge")[None] for f in frames)


def chairs_batch() -> tuple[np.ndarray, np.ndarray]:
    root = require_shared("flow", "flyingchairs")
    return tuple(np.stack([read_image(root / f"000000{i}-img{k}.ppm") for i in range(3)]) for k in (0, 1))


@functools.cache
def jitted_flows(size: str, corr_impl: str):
    model = RAFT(small=size == "small", corr_impl=corr_impl, unroll=1)  # rolled: compiles faster, same flows
    return jax.jit(lambda v, a, b: model.apply(v, a, b, iters=12))


def end_point_differences(flow: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(flow, np.float64) - reference, axis=-1)


def assert_flows_match(flow: np.ndarray, reference: np.ndarray, what: str):
    epe = end_point_differences(flow, reference)
    assert epe.mean() < MAX_MEAN_EPE_DIFF and epe.max() < MAX_EPE_DIFF, (
        f"{what}: end-point difference mean {epe.mean():.2e}, max {epe.max():.2e} px"
    )


@pytest.mark.parametrize("size", SIZES)
def test_encoders_match_reference(size, variables, reference):
    frames = chairs_batch()
    model = RAFT(small=size == "small")
    features = jax.jit(lambda v, x: model.apply(v, 0, x, method="stage"))(
        variables[size], {"image1": frames[0][:1], "image2": frames[1][:1]}
    )
    context_raw = jax.jit(lambda v, im: model.apply(v, im, method=lambda m, x: m.cnet(x, train=False)))(
        variables[size], features["image1"]
    )
    for name, ours in (("fmap1", features["fmap1"][0]), ("cnet", context_raw[0])):
        expected = reference[f"{size}/chairs0/{name}"]
        rel = np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max()
        assert ours.shape == expected.shape and rel < MAX_ENCODER_REL_ERROR, f"{size} {name}: max rel error {rel:.2e}"


@pytest.mark.parametrize("corr_impl", ["all_pairs", "on_the_fly"])
@pytest.mark.parametrize("size", SIZES)
def test_chairs_flows_match_reference(size, corr_impl, variables, reference):
    flows = np.asarray(jitted_flows(size, corr_impl)(variables[size], *chairs_batch()))
    assert flows.shape == (12, 3, 384, 512, 2) and flows.dtype == np.float32
    for index, pair in enumerate(CHAIRS):
        assert_flows_match(flows[11, index], reference[f"{size}/{pair}/flow_iter12"], f"{size} {corr_impl} {pair}")
    assert_flows_match(flows[0, 0], reference[f"{size}/chairs0/flow_iter1"], f"{size} {corr_impl} chairs0 iter 1")


@pytest.mark.parametrize("size", SIZES)
def test_sintel_flows_match_reference(size, variables, reference):
    flows = np.asarray(jitted_flows(size, "all_pairs")(variables[size], *sintel_padded()))
    assert tuple(reference[f"{size}/sintel_alley1/padded_shape"]) == flows.shape[2:4] == (440, 1024)
    for iteration, key in ((0, "flow_iter1"), (11, "flow_iter12")):
        assert_flows_match(flows[iteration, 0], reference[f"{size}/sintel_alley1/{key}"], f"{size} sintel {key}")


def test_on_the_fly_lookup_equals_all_pairs():
    """Both correlation options read the same features, also out of bounds and at odd pyramid sizes."""
    keys = jax.random.split(jax.random.key(0), 3)
    fmap1, fmap2 = (jax.random.normal(k, (2, 13, 10, 32)) for k in keys[:2])
    coords = jax.random.uniform(keys[2], (2, 13, 10, 2), minval=-6.0, maxval=18.0)

    @functools.partial(jax.jit, static_argnums=0)
    def lookup(impl):
        return lookup_corr(build_corr(fmap1, fmap2, num_levels=3, impl=impl), coords, radius=2)

    lookups = [lookup("all_pairs"), lookup("on_the_fly")]
    assert lookups[0].shape == (2, 13, 10, 3 * 25)
    np.testing.assert_allclose(lookups[1], lookups[0], atol=1e-5)


def test_lookup_is_grid_sample_window():
    """One window against a float64 NumPy bilinear sampler with zero padding (first window axis moves x)."""
    rng = np.random.default_rng(0)
    fmap1, fmap2 = rng.normal(size=(2, 1, 6, 7, 4)).astype(np.float32)
    centre = np.array([4.3, 1.6])  # (x, y), near the top border
    state = build_corr(jnp.asarray(fmap1), jnp.asarray(fmap2), num_levels=1, impl="all_pairs")
    coords = np.zeros((1, 6, 7, 2), np.float32)
    coords[0, 2, 3] = centre
    window = np.asarray(lookup_corr(state, jnp.asarray(coords), radius=1))[0, 2, 3].reshape(3, 3)
    volume = np.einsum("c,hwc->hw", fmap1[0, 2, 3].astype(np.float64), fmap2[0]) / 2.0

    def sample(x, y):
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        total = 0.0
        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                if 0 <= xi < 7 and 0 <= yi < 6:
                    total += wx * wy * volume[yi, xi]
        return total

    expected = np.array([[sample(centre[0] + i, centre[1] + j) for j in (-1, 0, 1)] for i in (-1, 0, 1)])
    np.testing.assert_allclose(window, expected, atol=1e-5)


def test_stages_chain_to_the_full_model(variables):
    model = RAFT(small=True, iters=2)
    rng = np.random.default_rng(0)
    image1, image2 = rng.uniform(0, 255, size=(2, 2, 64, 96, 3)).astype(np.float32)
    assert model.stage_names == ("features", "context", "flow")
    features, context, flows = jax.jit(lambda v, x: run_all_stages(model, v, x))(
        variables["small"], {"image1": image1, "image2": image2}
    )
    assert {k: v.shape for k, v in features.items()} == {
        "fmap1": (2, 8, 12, 128),
        "fmap2": (2, 8, 12, 128),
        "image1": (2, 64, 96, 3),
    }
    assert {k: v.shape for k, v in context.items()} == {
        "fmap1": (2, 8, 12, 128),
        "fmap2": (2, 8, 12, 128),
        "net": (2, 8, 12, 96),
        "inp": (2, 8, 12, 64),
    }
    assert float(jnp.abs(context["net"]).max()) <= 1 and float(context["inp"].min()) >= 0
    assert flows.shape == (2, 2, 64, 96, 2)
    direct = jax.jit(lambda v, a, b: model.apply(v, a, b, iters=2))(variables["small"], image1, image2)
    np.testing.assert_allclose(flows, direct, atol=1e-5)


@pytest.mark.parametrize(
    "shape1, shape2, message",
    [
        ((1, 64, 100, 3), (1, 64, 100, 3), "multiples of 8"),
        ((1, 64, 64, 3), (1, 64, 72, 3), "same shape"),
        ((1, 32, 64, 3), (1, 32, 64, 3), "at least 64x64"),
        ((1, 64, 64, 1), (1, 64, 64, 1), r"\(B, H, W, 3\)"),
    ],
)
def test_bad_frames_are_value_errors(variables, shape1, shape2, message):
    with pytest.raises(ValueError, match=message) as error:
        RAFT(small=True).apply(variables["small"], np.zeros(shape1, np.float32), np.zeros(shape2, np.float32))
    assert str(shape1) in str(error.value)


def test_unknown_corr_impl(variables):
    frames = np.zeros((1, 64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="unknown corr_impl 'cuda'"):
        RAFT(small=True, corr_impl="cuda").apply(variables["small"], frames, frames)


def test_unrolled_iterations_equal_the_rolled_scan():
    """The default (every iteration unrolled, for XLA:CPU's backward pass) computes what the rolled scan does."""
    rng = np.random.default_rng(0)
    frames = [rng.uniform(0, 255, (1, 64, 64, 3)).astype(np.float32) for _ in range(2)]
    rolled, unrolled = RAFT(small=True, iters=2, unroll=1), RAFT(small=True, iters=2)
    variables = jax.jit(rolled.init)(jax.random.key(0), *frames)

    def loss(model, params):
        flows = model.apply({"params": params}, *frames)
        return jnp.mean(flows**2), flows

    results = [
        jax.jit(jax.value_and_grad(functools.partial(loss, m), has_aux=True))(variables["params"])
        for m in (rolled, unrolled)
    ]
    (_, flows_rolled), grads_rolled = results[0]
    (_, flows_unrolled), grads_unrolled = results[1]
    np.testing.assert_allclose(flows_unrolled, flows_rolled, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(grads_rolled), jax.tree.leaves(grads_unrolled)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
