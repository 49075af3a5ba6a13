"""The device check (experiments/device_check.py) and what it reads: convolution counts in compiled HLO
(cuDNN's custom calls included), bench_ga's auto row, metrics.jsonl windows; and one ``--quick`` run on CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from experiments import device_check
from experiments.bench_train import count_convolutions
from tests.conftest import REPO_ROOT

# Shapes of real compiled modules: XLA's CPU convolution (inside a fusion), cuDNN's convolutions as
# custom calls (forward with fused bias/activation, and both backward kinds), this project's CPU kernel.
HLO_SAMPLE = """
%fused_convolution (p0: f32[8,32,32,16], p1: f32[3,3,16,16]) -> f32[8,32,32,16] {
  ROOT %convolution.3 = f32[8,32,32,16]{3,2,1,0} convolution(f32[8,32,32,16]{3,2,1,0} %p0, f32[3,3,16,16]{3,2,1,0} %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}
ENTRY %main {
  %custom-call.1 = (f32[8,16,32,32]{3,2,1,0}, u8[0]{0}) custom-call(f32[8,16,32,32]{3,2,1,0} %a, f32[16,16,3,3]{3,2,1,0} %w), window={size=3x3 pad=1_1x1_1}, dim_labels=bf01_oi01->bf01, custom_call_target="__cudnn$convForward", backend_config={}
  %custom-call.2 = (f32[8,16,32,32]{3,2,1,0}, u8[0]{0}) custom-call(%a, %w, %b), custom_call_target="__cudnn$convBiasActivationForward"
  %custom-call.3 = (f32[8,16,32,32]{3,2,1,0}, u8[0]{0}) custom-call(%g, %w), custom_call_target="__cudnn$convBackwardInput"
  %custom-call.4 = (f32[16,16,3,3]{3,2,1,0}, u8[0]{0}) custom-call(%a, %g), custom_call_target="__cudnn$convBackwardFilter"
  %custom-call.5 = f32[8,32,32,16]{3,2,1,0} custom-call(%x, %k), custom_call_target="hkt_conv3x3_forward"
  %custom-call.6 = f32[8,10]{1,0} custom-call(%x), custom_call_target="__cublas$gemm"
  %call = f32[8,32,32,16] call(%p0, %p1), to_apply=%fused_convolution
}
"""


def test_convolutions_are_counted_in_xla_cudnn_and_cpu_kernel_form():
    assert count_convolutions(HLO_SAMPLE) == 6  # 1 XLA + 4 cuDNN + 1 CPU kernel; the cuBLAS gemm is no convolution
    assert count_convolutions("ROOT %dot = f32[8,10] dot(%a, %b)") == 0


def test_ga_auto_row_is_found_by_the_auto_choice_or_its_own_row():
    rows = [
        {"case": "n16384", "mode": "gate", "impl": "-", "chunk_size": None, "chunk_rows": None, "fwd_bwd_ms": 0.1},
        {
            "case": "n16384",
            "mode": "softmax",
            "impl": "plain",
            "chunk_size": None,
            "chunk_rows": None,
            "fwd_bwd_ms": 9.0,
        },
        {
            "case": "n16384",
            "mode": "softmax",
            "impl": "chunked",
            "chunk_size": 512,
            "chunk_rows": 512,
            "fwd_bwd_ms": 7.0,
        },
        {
            "case": "n16384",
            "mode": "softmax",
            "impl": "chunked",
            "chunk_size": None,
            "chunk_rows": 1024,
            "fwd_bwd_ms": 4.0,
        },
    ]
    report = {"rows": rows, "auto_choice": {"n16384": {"impl": "chunked", "chunk_rows": 1024}}}
    assert device_check.ga_auto_fb_ms(report, "n16384") == 4.0
    report["rows"] = rows + [{"case": "n16384", "mode": "softmax", "impl": "auto", "fwd_bwd_ms": 3.0}]
    assert device_check.ga_auto_fb_ms(report, "n16384") == 3.0
    assert device_check.ga_auto_fb_ms({"rows": rows, "auto_choice": {}}, "n16384") is None


def test_training_windows_give_accuracy_over_a_step_range(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": s, "loss": 2.0, "accuracy": a, "img_per_s": 1000.0 + s}
        for s, a in ((50, 0.1), (300, 0.15), (350, 0.3), (400, 0.4))
    ]
    rows.insert(2, {"step": 300, "eval_accuracy": 0.9})  # eval rows are not training windows
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    windows = device_check.window_rows(metrics)
    assert [r["step"] for r in windows] == [50, 300, 350, 400]
    assert device_check.accuracy_between(windows, 300, 400) == pytest.approx(0.35)
    assert device_check.accuracy_between(windows, 400, 500) is None


def test_speed_targets_are_judged_on_gpus_only_and_functional_ones_everywhere():
    assert device_check.judge("hkt_step_vs_torch_eager", 0.5, "cpu") == "n/a (CPU)"
    assert device_check.judge("hkt_step_vs_torch_eager", 0.5, "gpu") == "fail"
    assert device_check.judge("hkt_step_vs_torch_eager", 0.25, "gpu") == "pass"
    assert device_check.judge("tests_failed", 1, "cpu") == "fail"
    assert device_check.judge("resnet110_leaves_chance", 0.1, "cpu") == "fail"
    assert device_check.judge("smoke_cold_s", None, "gpu") == "skipped"


def test_quick_run_reports_every_check_with_a_value_or_a_reason(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.device_check",
            "--quick",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["device"]
    assert set(report["checks"]) >= set(device_check.TARGETS)
    for key, value in report["checks"].items():
        if value is None:
            assert report["reasons"].get(key), f"{key} is null without a reason"
        else:
            assert isinstance(value, (bool, int, float)) and math.isfinite(value), (key, value)
    assert report["checks"]["tests_failed"] == 0 and report["checks"]["tests_passed"] == 2
    assert "--quick" in report["reasons"]["resnet110_leaves_chance"]
    assert "--quick" in report["reasons"]["hkt_step_bf16_vs_f32"]  # float32 only: no bfloat16 twin runs
    assert [row["check"] for row in report["table"]] == list(device_check.TARGETS)
    assert "| check" in proc.stdout  # the table


def test_tf32_is_set_alike_in_jax_and_pytorch():
    torch = pytest.importorskip("torch")
    import jax

    from experiments.bench_train import match_tf32

    before = (
        jax.config.jax_default_matmul_precision,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        highest = match_tf32(torch, "highest")
        assert highest["jax_default_matmul_precision"] == "highest" and not highest["jax_tf32"]
        assert highest["torch_matmul_allow_tf32"] is False and highest["torch_cudnn_allow_tf32"] is False
        default = match_tf32(torch, "default")
        assert jax.config.jax_default_matmul_precision is None
        assert default["jax_tf32"] == (jax.default_backend() == "gpu")
        assert default["torch_matmul_allow_tf32"] is True and default["torch_cudnn_allow_tf32"] is True
    finally:
        jax.config.update("jax_default_matmul_precision", before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]
