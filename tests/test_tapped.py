"""Tapped: any Linen module staged by module path, against the hand-staged CifarResNet,
flax's own ``capture_intermediates``, and an imagenet-example-style ResNet with no staging code."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hkt_jax.tasks import Classification
from hkt_jax.engine.hkt import HKT, HKTConfig
from hkt_jax.models import CifarResNet, Tapped, available_taps, tapped_boundaries
from hkt_jax.engine.stages import apply_stage, run_all_stages

GROUP_NAMES = ("group1", "group2", "group3", "head")
CHILD_TAPS = ("layer1_0", "layer2_0", "layer3_0")  # depth 8: one block per group
PARENT_TAPS = ("layer1_1", "layer2_1", "layer3_1")  # depth 14: two blocks per group


def _images(seed: int, batch: int = 8, size: int = 32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def _with_running_stats(variables: Any, seed: int) -> Any:
    """A 'pretrained' parent: running statistics away from the initial 0/1."""
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32), variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def _untap_keys(tree: Any) -> Any:
    """Tapped adapters are keyed ``to_child_0_feature``; the hand-staged ones ``to_child_0``."""
    if isinstance(tree, dict):
        return {k.removesuffix("_feature"): _untap_keys(v) for k, v in tree.items()}
    return tree


def _assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def _count_convolutions(compiled_text: str) -> int:
    return len(re.findall(r"\bconvolution\(", compiled_text))


# -- the wrapper itself --------------------------------------------------------------------------------


def test_variables_and_forward_are_the_wrapped_modules():
    plain = CifarResNet(depth=8, conv_impl="xla")
    tapped = Tapped(plain, taps=CHILD_TAPS)
    x = _images(0, 2)
    v_plain, v_tapped = plain.init(jax.random.key(3), x), tapped.init(jax.random.key(3), x)
    _assert_trees_close(v_plain, v_tapped, atol=0, rtol=0)  # same tree, same values: same checkpoints
    np.testing.assert_array_equal(tapped.apply(v_plain, x), plain.apply(v_plain, x))
    assert tapped.stage_names == (*CHILD_TAPS, "output")


def test_stages_match_hand_staged_and_capture_intermediates():
    staged = CifarResNet(depth=14, stage_split="groups", conv_impl="xla")
    plain = CifarResNet(depth=14, conv_impl="xla")
    tapped = Tapped(plain, taps=PARENT_TAPS, names=GROUP_NAMES)
    x = _images(1, 4)
    variables = _with_running_stats(staged.init(jax.random.key(0), x), 1)
    _, state = plain.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    captured = [state["intermediates"][tap]["__call__"][0] for tap in PARENT_TAPS]
    for train in (False, True):
        want = run_all_stages(staged, variables, x, train=train)
        got = run_all_stages(tapped, variables, x, train=train)
        for i, (w, g) in enumerate(zip(want, got)):
            np.testing.assert_allclose(g if i == 3 else g["feature"], w, atol=1e-5, rtol=1e-5)
            if i < 3:
                np.testing.assert_array_equal(g["input"], x)
                if not train:
                    np.testing.assert_allclose(g["feature"], captured[i], atol=1e-5, rtol=1e-5)


# -- HKT with both networks tapped == HKT with both hand-staged ------------------------------------------


@functools.lru_cache(maxsize=None)
def _hkt_pair(tapped: bool):
    child = CifarResNet(depth=8, stage_split="groups", conv_impl="xla")
    parent = CifarResNet(depth=14, stage_split="groups", conv_impl="xla")
    config = HKTConfig(lam=0.6, alphas=(0.25, 0.5, 0.25), inherit_loss="mae")
    if tapped:
        child = Tapped(CifarResNet(depth=8, conv_impl="xla"), CHILD_TAPS, names=GROUP_NAMES)
        parent = Tapped(CifarResNet(depth=14, conv_impl="xla"), PARENT_TAPS, names=GROUP_NAMES)
        config = HKTConfig(
            lam=0.6, alphas=(0.25, 0.5, 0.25), inherit_loss="mae", boundaries=tapped_boundaries(child, parent)
        )
    engine = HKT(child, parent, config, task=Classification())
    tx = optax.sgd(0.05, momentum=0.9)

    def train_step(params, batch_stats, opt_state, parent_variables, batch):
        grad_fn = jax.value_and_grad(engine.loss, has_aux=True)
        (loss, aux), grads = grad_fn(params, batch_stats, parent_variables, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), aux["batch_stats"], opt_state, loss, grads

    return engine, tx, jax.jit(train_step)


@pytest.fixture(scope="module")
def hkt_runs():
    x = _images(2, size=16)  # 16x16: softmax GA over 256 tokens keeps the compiled steps small
    # Initialised inside jit: one program each, where eager initialisation compiles every operation alone.
    parent_variables = _with_running_stats(
        jax.jit(CifarResNet(depth=14, conv_impl="xla").init)(jax.random.key(7), x), 7
    )
    batches = [{"image": _images(10 + s, size=16), "label": jnp.arange(8) % 10} for s in range(3)]
    runs = {}
    for tapped in (False, True):
        engine, tx, step = _hkt_pair(tapped)
        variables = _untap_keys(jax.jit(engine.init)(jax.random.key(5), x, parent_variables))
        params, stats = variables["params"], variables["batch_stats"]
        if tapped:  # the same adapters under the tapped engine's names
            params = {**params, "adapters": {f"{k}_feature": v for k, v in params["adapters"].items()}}
        opt_state = tx.init(params)
        compiled = step.lower(params, stats, opt_state, parent_variables, batches[0]).compile()
        history = []
        for batch in batches:
            params, stats, opt_state, loss, grads = compiled(params, stats, opt_state, parent_variables, batch)
            history.append((float(loss), _untap_keys(grads), _untap_keys(params), stats))
        runs[tapped] = {
            "history": history,
            "hlo": compiled.as_text(),
            "step": step,
            "args": (params, stats, opt_state, parent_variables, batches[0]),
        }
    return runs


def test_hkt_loss_gradients_and_batch_stats_match_hand_staged(hkt_runs):
    staged, tapped = hkt_runs[False]["history"], hkt_runs[True]["history"]
    assert staged[0][0] > 0
    for (loss_s, grads_s, params_s, stats_s), (loss_t, grads_t, params_t, stats_t) in zip(staged, tapped):
        np.testing.assert_allclose(loss_t, loss_s, rtol=1e-5)
        _assert_trees_close(grads_t, grads_s, atol=2e-5, rtol=1e-4)
        _assert_trees_close(params_t, params_s, atol=2e-5, rtol=1e-4)
        _assert_trees_close(stats_t, stats_s, atol=1e-5, rtol=1e-5)
    # the running statistics did move (once per step): a double update would show here
    first = jax.tree.leaves(tapped[0][3])
    assert any(float(jnp.abs(a - b).max()) > 1e-4 for a, b in zip(first, jax.tree.leaves(tapped[-1][3])))


def test_compiled_hkt_step_has_no_extra_convolutions(hkt_runs):
    staged = _count_convolutions(hkt_runs[False]["hlo"])
    tapped = _count_convolutions(hkt_runs[True]["hlo"])
    assert tapped == staged, (tapped, staged)


def test_dead_work_of_a_stage_is_traced_and_then_removed():
    """Stage 2 of a tapped ResNet-8 traces the stem and group 1 (5 convolutions);
    compiled, only group 3's two remain, as in the hand-staged stage."""
    staged = CifarResNet(depth=8, stage_split="groups", conv_impl="xla")
    tapped = Tapped(CifarResNet(depth=8, conv_impl="xla"), CHILD_TAPS, names=GROUP_NAMES)
    x = _images(0, 2)
    variables = staged.init(jax.random.key(0), x)
    feature = jnp.ones((2, 16, 16, 32), jnp.float32)

    def tapped_stage(v, x, f):
        return apply_stage(tapped, v, 2, {"input": x, "feature": f}, train=True, update_stats=True)

    def staged_stage(v, f):
        return apply_stage(staged, v, 2, f, train=True, update_stats=True)

    traced = str(jax.make_jaxpr(tapped_stage)(variables, x, feature)).count("conv_general_dilated")
    compiled = _count_convolutions(jax.jit(tapped_stage).lower(variables, x, feature).compile().as_text())
    reference = _count_convolutions(jax.jit(staged_stage).lower(variables, feature).compile().as_text())
    assert (traced, compiled, reference) == (5, 2, 2)


# -- a model written without any staging code, as flax's examples/imagenet writes a ResNet ----------------


class ResNetBlock(nn.Module):
    filters: int
    conv: Callable
    norm: Callable
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ImagenetStyleResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 16

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = conv(self.num_filters, (3, 3), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, act=nn.relu, strides=strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def test_imagenet_style_resnet_is_a_frozen_parent_through_taps():
    parent_module = ImagenetStyleResNet(stage_sizes=(1, 2, 1), num_classes=4, num_filters=8)
    x = _images(20, 16, size=16)
    paths = available_taps(parent_module, x, train=False)
    assert [p for p in paths if "/" not in p and p.startswith("ResNetBlock")] == [f"ResNetBlock_{i}" for i in range(4)]
    parent = Tapped(parent_module, taps=("ResNetBlock_0", "ResNetBlock_2", "ResNetBlock_3"), names=GROUP_NAMES)
    child = CifarResNet(depth=8, num_classes=4, stage_split="groups", conv_impl="xla")  # hand-staged
    init = jax.jit(parent_module.init, static_argnames="train")  # one program, not one per operation
    parent_variables = _with_running_stats(init(jax.random.key(1), x, train=False), 1)
    parent_before = jax.tree.map(np.array, parent_variables)
    engine = HKT(child, parent, HKTConfig(boundaries=tapped_boundaries(child, parent)), task=Classification())
    variables = jax.jit(engine.init)(jax.random.key(2), x, parent_variables)
    tx = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state, batch):
        (loss, aux), grads = jax.value_and_grad(engine.loss, has_aux=True)(params, batch_stats, parent_variables, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), aux["batch_stats"], opt_state, loss, grads

    # four classes, each a different mean colour under noise
    labels = jnp.arange(16) % 4
    colours = jnp.asarray([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, -1]], jnp.float32)
    params, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    losses = []
    for s in range(20):
        batch = {"image": 0.7 * _images(100 + s, 16, size=16) + colours[labels][:, None, None, :], "label": labels}
        params, stats, opt_state, loss, grads = step(params, stats, opt_state, batch)
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    # the head stream's gradient reaches the child through the tapped parent's later stages
    assert float(jnp.abs(grads["adapters"]["to_parent_0_feature"]["proj"]["kernel"]).max()) > 0
    jax.tree.map(np.testing.assert_array_equal, parent_variables, parent_before)


# -- networks that reuse earlier activations, pytree taps, errors --------------------------------------


class TwoOutputs(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="a")(x), nn.Dense(4, name="b")(x)


class SkipNet(nn.Module):
    """A U-Net in miniature: the decoder reuses the encoder's first activation."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        e1 = nn.Dense(4, name="enc1")(x)
        a, b = TwoOutputs(name="enc2")(jnp.tanh(e1))
        return nn.Dense(3, name="dec")(jnp.concatenate([a * b, e1], axis=-1))


def test_skip_connections_and_pytree_taps_stay_correct():
    model = Tapped(SkipNet(), taps=("enc2",))
    x = jax.random.normal(jax.random.key(0), (2, 5))
    variables = model.init(jax.random.key(1), x)
    first, out = run_all_stages(model, variables, x)
    np.testing.assert_allclose(out, SkipNet().apply(variables, x), rtol=1e-6)
    assert isinstance(first["feature"], tuple) and len(first["feature"]) == 2
    # handing in other features: the decoder sees them and the (recomputed) encoder skip
    p = variables["params"]
    a, b = jnp.ones((2, 4)), 2 * jnp.ones((2, 4))
    got, _ = apply_stage(model, variables, 1, {"input": x, "feature": (a, b)}, train=False)
    e1 = x @ p["enc1"]["kernel"] + p["enc1"]["bias"]
    want = jnp.concatenate([a * b, e1], axis=-1) @ p["dec"]["kernel"] + p["dec"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class SharedDense(nn.Module):
    def setup(self):
        self.dense = nn.Dense(5)
        self.out = nn.Dense(2)

    def __call__(self, x, train: bool = False):
        return self.out(self.dense(self.dense(x)))


class TaggedOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(x), 3


class TaggedNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        y, _ = TaggedOutput(name="tagged")(x)
        return nn.Dense(2, name="out")(y)


def test_errors_name_the_problem():
    x = jnp.ones((2, 5))
    images = _images(0, 2)
    with pytest.raises(ValueError, match=r"no submodule call at \['layer9_0'\].*'layer2_0'"):
        Tapped(CifarResNet(depth=8, conv_impl="xla"), taps=("layer1_0", "layer9_0")).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match=r"tap 'dense' is ambiguous"):
        Tapped(SharedDense(), taps=("dense",)).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"tap 'tagged' must be an array or a pytree of arrays.*int"):
        model = Tapped(TaggedNet(), taps=("tagged",))
        apply_stage(model, model.init(jax.random.key(0), x), 0, x, train=False)
    with pytest.raises(ValueError, match=r"order the forward calls them.*'layer1_0' starts before 'layer2_0'"):
        Tapped(CifarResNet(depth=8, conv_impl="xla"), taps=("layer2_0", "layer1_0")).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match=r"`names` has 3"):
        Tapped(SkipNet(), taps=("enc2",), names=("a", "b", "c")).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"submodule paths"):
        Tapped(SkipNet(), taps="enc2").init(jax.random.key(0), x)
