"""U-Net / PocketNet: parameter counts, stage outputs, PyTorch parity, HKT on the pair."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkt_jax.models.unet as unet_module
from hkt_jax.engine.hkt import HKT, Boundary, HKTConfig, LeafLink
from hkt_jax.models.registry import parameter_count
from hkt_jax.models.unet import DenseUNet, PocketNet, UNet
from hkt_jax.tasks.seg_metrics import segmentation_loss
from hkt_jax.tasks.segmentation import Segmentation

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs

try:
    import torch
except ImportError:  # only the PyTorch comparisons need it (requirements-torch.txt); the rest runs without
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed (pip install -r requirements-torch.txt)")


# -- the PyTorch U-Net in milesial/Pytorch-UNet's module names (bilinear=False): the export's twin, written
# in PyTorch with its own layers, the reference the converter and the Flax U-Net are compared with ---------

if torch is not None:
    from hkt_jax.convert.torch_unet import TorchUNet


def _randomise(module, seed):
    """Random weights and non-trivial BatchNorm running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype != torch.float32:
                continue
            values = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                values = 0.5 + values.abs()
            elif name.endswith(("weight", "bias")) and tensor.ndim == 1:
                values = 1.0 + 0.2 * values
            else:
                values = (
                    values * 0.3 if name.endswith("running_mean") else values * (2.0 / max(tensor[0].numel(), 1)) ** 0.5
                )
            tensor.copy_(values)
    return module.eval()


def _double_conv_params(cin, cout):
    return 9 * cin * cout + 9 * cout * cout + 4 * cout  # two bias-free convs + two BN (scale, bias)


def _dense_block_params(cin, cout, growth=32, layers=4):
    count = sum(2 * (cin + i * growth) + 9 * (cin + i * growth) * growth for i in range(layers))  # BN, conv
    return count + (cin + layers * growth) * cout + 2 * cout  # 1x1 transition + BN


def _formula_count(widths, bottleneck, in_channels, num_classes, encoder_block=_double_conv_params):
    count, cin = 0, in_channels
    for w in widths:
        count += encoder_block(cin, w)
        cin = w
    count += encoder_block(cin, bottleneck)
    below = bottleneck
    for w in reversed(widths):
        count += 4 * below * w + w + _double_conv_params(2 * w, w)  # transposed conv + decoder
        below = w
    return count + widths[0] * num_classes + num_classes


@pytest.mark.parametrize(
    "model, widths, bottleneck",
    [
        (UNet(), (64, 128, 256, 512), 1024),
        (PocketNet(width=32, depth=4), (32,) * 4, 32),
        (PocketNet(width=16, depth=4), (16,) * 4, 16),
    ],
)
def test_parameter_counts(model, widths, bottleneck):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    count = parameter_count(shapes["params"])
    assert count == _formula_count(widths, bottleneck, 1, 3)
    if torch is not None:
        with torch.device("meta"):
            torch_model = TorchUNet(widths, bottleneck, 1, 3)
        assert count == sum(p.numel() for p in torch_model.parameters())
    if isinstance(model, PocketNet):
        assert count < 1_000_000
    assert f"{count:,}" in unet_module.__doc__  # the documented count is the real one


def test_dense_unet_parameter_count_and_stages():
    model = DenseUNet()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    count = parameter_count(shapes["params"])
    assert count == _formula_count((64, 128, 256, 512), 1024, 1, 3, _dense_block_params)
    assert f"{count:,}" in DenseUNet.__doc__
    encoder, bottleneck, logits = _stage_shapes(
        DenseUNet(widths=(4, 8), growth=3, layers_per_block=2), jnp.ones((2, 16, 16, 1))
    )
    assert encoder == {"skips": ((2, 16, 16, 4), (2, 8, 8, 8)), "x": (2, 4, 4, 8)}
    assert bottleneck == {"skips": encoder["skips"], "x": (2, 4, 4, 16)}
    assert logits == (2, 16, 16, 3)


def _random_variables(model, x, seed=0):
    """Random params and BatchNorm statistics from NumPy (XLA:CPU compiles random inits slowly)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jnp.asarray(0.5 + rng.random(leaf.shape), jnp.float32)
        scale = (2.0 / np.prod(leaf.shape[:-1])) ** 0.5 if "kernel" in name else 0.2
        return jnp.asarray(rng.normal(size=leaf.shape) * scale + ("scale" in name), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _stage_shapes(model, x):
    """Shapes of every stage output, traced only (no compute)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes, h = [], x
    for index in range(3):
        h = jax.eval_shape(lambda v, h, i=index: model.apply(v, i, h, train=False, method="stage"), variables, h)
        shapes.append(jax.tree.map(lambda a: tuple(a.shape), h))
    return shapes


def test_stage_outputs_have_expected_shapes():
    encoder, bottleneck, logits = _stage_shapes(
        UNet(widths=(4, 8, 16), num_classes=3, in_channels=2), jnp.ones((2, 32, 24, 2))
    )
    skips = ((2, 32, 24, 4), (2, 16, 12, 8), (2, 8, 6, 16))
    assert encoder == {"skips": skips, "x": (2, 4, 3, 16)}
    assert bottleneck == {"skips": skips, "x": (2, 4, 3, 32)}
    assert logits == (2, 32, 24, 3)
    pocket = PocketNet(width=8, depth=2, num_classes=2)
    encoder, bottleneck, logits = _stage_shapes(pocket, jnp.ones((1, 16, 16, 1)))
    assert encoder == bottleneck == {"skips": ((1, 16, 16, 8), (1, 8, 8, 8)), "x": (1, 4, 4, 8)}
    assert logits == (1, 16, 16, 2)
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth = 4"):
        jax.eval_shape(pocket.init, jax.random.key(0), jnp.ones((1, 18, 16, 1)))
    with pytest.raises(ValueError, match="\\(B, H, W, 1\\)"):
        jax.eval_shape(pocket.init, jax.random.key(0), jnp.ones((1, 16, 16, 3)))


def test_call_is_all_stages_in_order():
    model, x = PocketNet(width=4, depth=2), jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
    variables = _random_variables(model, x)

    @jax.jit
    def both(v, x):
        staged = x
        for index in range(3):
            staged = model.apply(v, index, staged, train=False, method="stage")
        return model.apply(v, x, train=False), staged

    whole, staged = both(variables, x)
    np.testing.assert_array_equal(whole, staged)


@needs_torch
def test_forward_matches_pytorch_unet_with_same_weights():
    from hkt_jax.convert.unet import unet_from_torch, unet_to_torch

    widths, bottleneck = (8, 16, 32, 64), 128
    torch_model = _randomise(TorchUNet(widths, bottleneck, 1, 3), seed=0)
    model = UNet(widths=widths, num_classes=3, in_channels=1)
    variables = unet_from_torch(torch_model.state_dict(), model)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    assert np.abs(expected).max() > 1.0  # non-trivial outputs
    assert np.abs(got - expected).max() < 1e-4

    exported = unet_to_torch(variables, model)
    TorchUNet(widths, bottleneck, 1, 3).load_state_dict(exported, strict=True)
    for key, value in torch_model.state_dict().items():
        if value.dtype == torch.float32:
            np.testing.assert_array_equal(exported[key].numpy(), value.numpy(), err_msg=key)


@needs_torch
def test_converter_lists_every_unmatched_key():
    from hkt_jax.convert.unet import unet_from_torch

    state = TorchUNet((4, 8), 16, 1, 3).state_dict()
    del state["up1.up.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["outc.conv.weight"] = torch.zeros(5, 4, 1, 1)
    with pytest.raises(ValueError) as error:
        unet_from_torch(state, UNet(widths=(4, 8), num_classes=3))
    message = str(error.value)
    assert "up1.up.bias" in message and "extra.weight" in message and "outc.conv.weight" in message
    with pytest.raises(ValueError, match="checkpoint has depth 3 .*, the model 2"):
        unet_from_torch(TorchUNet((4, 8, 8), 16, 1, 3).state_dict(), UNet(widths=(4, 8), num_classes=3))


# -- HKT on a tiny U-Net parent -> PocketNet child -------------------------------------------------

PARENT = UNet(widths=(8, 16), num_classes=3)
CHILD = PocketNet(width=4, depth=2, num_classes=3)
# Mix the bottom features and the deepest skip at both boundaries, both directions.
LINKS = (LeafLink("x", ("x",)), LeafLink("skips/1", ("skips/1",)))
BOUNDARIES = (Boundary(to_child=LINKS, to_parent=LINKS),) * 2


def _seg_batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((4, 16, 16), np.int32)
    mask[:, 3:12, 4:13] = 1
    mask[:, 6:9, 6:9] = 2
    image = (mask / 2.0 + 0.3 * rng.normal(size=mask.shape))[..., None].astype(np.float32)
    return {"image": jnp.asarray(image), "mask": jnp.asarray(mask)}


@pytest.fixture(scope="module")
def parent_variables():
    return _random_variables(PARENT, _seg_batch()["image"], seed=1)


def _engine(lam=0.6, alphas=(0.2, 0.6, 0.2)):
    return HKT(
        CHILD,
        PARENT,
        HKTConfig(lam=lam, alphas=alphas, mode="softmax", boundaries=BOUNDARIES),
        task=Segmentation(),
        task_loss=segmentation_loss,
        inherit_loss=segmentation_loss,
    )


@pytest.fixture(scope="module")
def hkt_variables(parent_variables):
    """Child + adapters; the same for every (lam, alphas) since only shapes decide the adapters."""
    # An RBG key: XLA:CPU compiles threefry's random initialisers several times slower.
    return jax.jit(_engine().init)(jax.random.key(2, impl="unsafe_rbg"), _seg_batch()["image"], parent_variables)


def test_hkt_adapters_bridge_the_widths(hkt_variables):
    kernels = {key: value["proj"]["kernel"].shape for key, value in hkt_variables["params"]["adapters"].items()}
    assert kernels == {
        "to_child_0_x": (16, 4),
        "to_child_0_skips_1": (16, 4),
        "to_parent_0_x": (4, 16),
        "to_parent_0_skips_1": (4, 16),
        "to_child_1_x": (32, 4),
        "to_child_1_skips_1": (16, 4),
        "to_parent_1_x": (4, 32),
        "to_parent_1_skips_1": (4, 16),
    }


def test_hkt_parent_is_frozen_and_gradients_reach_child_and_adapters(parent_variables, hkt_variables):
    engine, batch, variables = _engine(), _seg_batch(), hkt_variables

    def loss(params, parent):
        return engine.loss(params, variables["batch_stats"], parent, batch)[0]

    child_grads, parent_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], parent_variables)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(parent_grads))
    assert float(jnp.abs(child_grads["child"]["head"]["kernel"]).max()) > 0
    for key, adapter in child_grads["adapters"].items():
        assert float(jnp.abs(adapter["proj"]["kernel"]).max()) > 0, key


def test_hkt_with_lambda_zero_and_only_native_loss_is_a_plain_child_step(parent_variables, hkt_variables):
    engine, batch, variables = _engine(lam=0.0, alphas=(0.0, 1.0, 0.0)), _seg_batch(1), hkt_variables
    tx = optax.sgd(0.1, momentum=0.9)

    def hkt_step(params, stats):
        (loss, aux), grads = jax.value_and_grad(engine.loss, has_aux=True)(params, stats, parent_variables, batch)
        updates, _ = tx.update(grads, tx.init(params), params)
        return loss, optax.apply_updates(params, updates)["child"], aux["batch_stats"]["child"]

    def child_step(params, stats):
        def loss_fn(p):
            logits, mutated = CHILD.apply(
                {"params": p, "batch_stats": stats}, batch["image"], train=True, mutable=["batch_stats"]
            )
            return segmentation_loss(logits, batch), mutated["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return loss, optax.apply_updates(params, updates), new_stats

    hkt = jax.jit(hkt_step)(variables["params"], variables["batch_stats"])
    plain = jax.jit(child_step)(variables["params"]["child"], variables["batch_stats"]["child"])
    np.testing.assert_allclose(hkt[0], plain[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(hkt[1:]), jax.tree.leaves(plain[1:])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(hkt[1]) == jax.tree.structure(plain[1])
