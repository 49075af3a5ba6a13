"""The per-convolution kernel-or-XLA choice of ``conv_impl="auto"`` (hkt_jax.kernels.conv_tuning)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hkt_jax.runtime import cpu_info
from hkt_jax.kernels import cpu_conv, conv_tuning


@pytest.fixture(autouse=True)
def fresh_choices(tmp_path, monkeypatch):
    """Choices in a fresh folder (the kernel builds stay in the usual cache), nothing remembered, 3 rounds."""
    try:
        library = cpu_conv.load()
    except RuntimeError as err:
        pytest.skip(f"CPU conv kernels cannot be built here: {err}")
    monkeypatch.setattr(conv_tuning, "choices_dir", lambda: tmp_path)
    monkeypatch.setattr(conv_tuning, "_memory", {})
    monkeypatch.setenv("HKT_JAX_CONV_TUNE_ROUNDS", "3")
    monkeypatch.delenv("HKT_JAX_CONV_AUTO", raising=False)
    return library


class FakeMeasure:
    """Stands in for the timing: kernel / XLA ratio as given, and counts the tunings."""

    def __init__(self, ratio: float):
        self.ratio, self.calls = ratio, 0

    def __call__(self, candidates, args):
        assert set(candidates) == {"kernel", "xla"}
        self.calls += 1
        return {"kernel": self.ratio * 1e-3, "xla": 1e-3, "ratio": self.ratio, "paired_ratio": self.ratio}


X_SHAPE, W_SHAPE = (8, 32, 32, 16), (3, 3, 16, 16)  # 38 MFLOP: above the untimed threshold
BIG = 1e9


def _decide(library, key="forward x=a w=b s=1", flops=BIG):
    return conv_tuning.use_kernel(key, flops, library, lambda: cpu_conv.candidates("forward", X_SHAPE, W_SHAPE, 1))


def _slow_conv(x, w):
    """The same convolution done six times over: a candidate that is certainly slower."""
    return lax.fori_loop(0, 6, lambda i, acc: acc + cpu_conv._xla_conv(x + i, w, 1), jnp.zeros((8, 32, 32, 16)))


@pytest.mark.parametrize("slow_name", ["kernel", "xla"])
def test_real_timing_never_picks_a_slower_candidate(slow_name):
    fast = lambda x, w: cpu_conv._xla_conv(x, w, 1)
    fns = {slow_name: _slow_conv, ("xla" if slow_name == "kernel" else "kernel"): fast}
    seconds = conv_tuning.measure(fns, conv_tuning.random_operands((X_SHAPE, W_SHAPE)))
    assert conv_tuning.choose(seconds) == ("xla" if slow_name == "kernel" else "kernel"), seconds


def test_margin_kernel_must_be_clearly_faster():
    choose = lambda best, paired: conv_tuning.choose({"ratio": best, "paired_ratio": paired})
    assert choose(0.95, 0.9) == "xla" and choose(1.5, 0.8) == "xla"
    assert choose(0.85, 0.95) == "kernel"
    assert choose(0.5, 1.2) == "xla"  # one lucky call, slower in most rounds


def test_choice_is_cached_on_disk_and_reused(fresh_choices, monkeypatch, tmp_path):
    fake = FakeMeasure(0.5)
    monkeypatch.setattr(conv_tuning, "measure", fake)
    assert _decide(fresh_choices) and fake.calls == 1
    assert _decide(fresh_choices) and fake.calls == 1  # in memory
    monkeypatch.setattr(conv_tuning, "_memory", {})
    assert _decide(fresh_choices) and fake.calls == 1  # from the file
    (path,) = tmp_path.glob("conv_choices-*.json")
    data = json.loads(path.read_text())
    assert data["signature"]["cpu"] == cpu_info.describe_cpu()
    assert data["choices"]["forward x=a w=b s=1"]["choice"] == "kernel"


def test_another_cpu_decides_again(fresh_choices, monkeypatch, tmp_path):
    fake = FakeMeasure(0.5)
    monkeypatch.setattr(conv_tuning, "measure", fake)
    assert _decide(fresh_choices)
    monkeypatch.setattr(conv_tuning, "_memory", {})
    monkeypatch.setattr(cpu_info, "cpu_signature", lambda: "another-cpu")
    monkeypatch.setattr(cpu_info, "describe_cpu", lambda: "AMD EPYC 7R13 (avx2, no avx512)")
    fake.ratio = 3.0  # slower there
    assert not _decide(fresh_choices) and fake.calls == 2
    assert len(list(tmp_path.glob("conv_choices-*.json"))) == 2


def test_capping_xla_at_avx2_decides_again(fresh_choices, monkeypatch, tmp_path):
    """experiments/emulate_avx2.sh caps XLA's instruction set: XLA's side of every choice changes with it."""
    fake = FakeMeasure(0.5)
    monkeypatch.setattr(conv_tuning, "measure", fake)
    assert _decide(fresh_choices)
    monkeypatch.setattr(conv_tuning, "_memory", {})
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_cpu_max_isa=AVX2")
    assert conv_tuning.signature(fresh_choices)["xla_max_isa"] == "AVX2"
    assert _decide(fresh_choices) and fake.calls == 2
    assert len(list(tmp_path.glob("conv_choices-*.json"))) == 2


def test_isa_caps_are_named_with_the_cpu():
    env = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "HKT_JAX_KERNEL_MARCH": "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2"}
    text = cpu_info.describe_cpu("AMD EPYC 9R45", frozenset({"avx2", "avx512f"}), env=env)
    assert text == "AMD EPYC 9R45 (avx512f; limited to XLA AVX2, kernels x86-64-v3, PyTorch avx2)"
    assert cpu_info.describe_cpu("AMD EPYC 7R13", frozenset({"avx2"}), env={}) == "AMD EPYC 7R13 (avx2, no avx512)"
    assert cpu_info.xla_max_isa({"XLA_FLAGS": "--xla_cpu_max_isa=AVX --xla_cpu_max_isa=SSE4_2"}) == "SSE4_2"


def test_a_foreign_signature_in_the_file_is_not_trusted(fresh_choices, monkeypatch):
    fake = FakeMeasure(3.0)
    monkeypatch.setattr(conv_tuning, "measure", fake)
    path = conv_tuning.cache_path(conv_tuning.signature(fresh_choices))
    foreign = {"signature": {"cpu": "other"}, "choices": {"forward x=a w=b s=1": {"choice": "kernel"}}}
    path.write_text(json.dumps(foreign))
    assert not _decide(fresh_choices) and fake.calls == 1


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"signature": 3}', ""])
def test_corrupt_cache_file_retunes_and_is_rewritten(fresh_choices, monkeypatch, garbage):
    fake = FakeMeasure(0.5)
    monkeypatch.setattr(conv_tuning, "measure", fake)
    path = conv_tuning.cache_path(conv_tuning.signature(fresh_choices))
    path.write_text(garbage)
    assert _decide(fresh_choices) and fake.calls == 1
    assert json.loads(path.read_text())["choices"]["forward x=a w=b s=1"]["choice"] == "kernel"


def test_failing_candidate_means_xla(fresh_choices, monkeypatch):
    def broken(candidates, args):
        raise RuntimeError("kernel crashed")

    monkeypatch.setattr(conv_tuning, "measure", broken)
    assert not _decide(fresh_choices)


def test_small_convolutions_go_to_xla_untimed(fresh_choices, monkeypatch):
    fake = FakeMeasure(0.1)
    monkeypatch.setattr(conv_tuning, "measure", fake)
    assert not _decide(fresh_choices, flops=conv_tuning.MIN_TUNED_FLOPS / 2) and fake.calls == 0


@pytest.mark.parametrize("forced", ["kernel", "xla"])
def test_environment_forces_a_side(fresh_choices, monkeypatch, forced):
    fake = FakeMeasure(0.5 if forced == "xla" else 3.0)  # the opposite of what is forced
    monkeypatch.setattr(conv_tuning, "measure", fake)
    monkeypatch.setenv("HKT_JAX_CONV_AUTO", forced)
    assert _decide(fresh_choices) == (forced == "kernel") and fake.calls == 0
    monkeypatch.setenv("HKT_JAX_CONV_AUTO", "sometimes")
    with pytest.raises(ValueError, match="HKT_JAX_CONV_AUTO"):
        _decide(fresh_choices)


def test_each_direction_follows_its_own_choice(fresh_choices, monkeypatch):
    """Cached: forward on XLA, weight gradient on the kernel, input gradient on XLA; the compiled gradient
    program holds exactly the weight-gradient custom call."""
    monkeypatch.setattr(conv_tuning, "measure", FakeMeasure(1.0))  # anything not pre-set: XLA
    sig = conv_tuning.signature(fresh_choices)
    key = "x=8x32x32x16 w=3x3x16x16 s=1"
    for direction, choice in [("forward", "xla"), ("weight_grad", "kernel"), ("input_grad", "xla")]:
        conv_tuning.write_choice(conv_tuning.cache_path(sig), sig, f"{direction} {key}", {"choice": choice})
    loss = lambda x, w: jnp.sum(jnp.sin(cpu_conv.conv3x3(x, w, 1, cpu_conv.TUNED)))
    text = jax.jit(jax.grad(loss, (0, 1))).lower(jnp.ones(X_SHAPE), jnp.ones(W_SHAPE)).as_text()
    assert fresh_choices.weight_grad in text and fresh_choices.fwd not in text


def test_tuning_inside_jit_gives_right_values_and_fills_the_cache(fresh_choices, tmp_path, capsys):
    """Real timing at trace time, under jit and grad; whatever it picks, values and gradients are exact."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=X_SHAPE), jnp.float32)
    w = jnp.asarray(rng.normal(size=W_SHAPE), jnp.float32)
    tuned = jax.jit(
        jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(cpu_conv.conv3x3(a, b, 1, cpu_conv.TUNED))), (0, 1))
    )
    reference = jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(cpu_conv._xla_conv(a, b, 1))), (0, 1))
    (v, (dx, dw)), (v_ref, (dx_ref, dw_ref)) = tuned(x, w), reference(x, w)
    np.testing.assert_allclose(v, v_ref, rtol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-2)
    (path,) = tmp_path.glob("conv_choices-*.json")
    choices = json.loads(path.read_text())["choices"]
    assert {k.split()[0] for k in choices} == {"forward", "input_grad", "weight_grad"}
    assert all(
        c["choice"] == conv_tuning.choose({"ratio": c["kernel_over_xla"], "paired_ratio": c["paired_kernel_over_xla"]})
        for c in choices.values()
    )
    assert "tuning CPU convolutions for" in capsys.readouterr().err
