"""``python -m experiments.estimate_flow`` on the shared Sintel pair, and the flow file formats it writes.

The model is RAFT-S with princeton-vl's reference weights, so the cropped flow must equal
the reference flow computed on the same padded frames (12 iterations).
"""

from __future__ import annotations

import numpy as np
import pytest

from experiments.estimate_flow import main, pad_to_multiple_of_8
from hkt_jax.data.flow_io import FLO_MAGIC, flow_to_color, make_colorwheel, read_flo, read_image, write_flo
from tests.conftest import require_shared

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs


@pytest.fixture(scope="module")
def raft_small_dir(tmp_path_factory):
    pytest.importorskip("torch", reason="converting the reference checkpoint needs PyTorch")
    from hkt_jax.convert.__main__ import main as convert

    out = tmp_path_factory.mktemp("models") / "raft_small"
    assert (
        convert(["raft", "--src", str(require_shared("raft-reference", "raft-small-seed0.pth")), "--out", str(out)])
        == 0
    )
    return out


def sintel(name: str):
    return require_shared("flow", "sintel-alley1", name)


def test_sintel_pair_flow_matches_reference(raft_small_dir, tmp_path, capsys):
    out, png = tmp_path / "flow.flo", tmp_path / "flow.png"
    assert (
        main(
            [
                "--model",
                str(raft_small_dir),
                str(sintel("frame_0001.png")),
                str(sintel("frame_0002.png")),
                "--out",
                str(out),
                "--png",
                str(png),
                "--iters",
                "12",
                "--gt",
                str(sintel("frame_0001.flo")),
            ]
        )
        == 0
    )
    flow = read_flo(out)
    assert flow.shape == (436, 1024, 2) and flow.dtype == np.float32
    reference = np.load(require_shared("raft-reference", "reference_flows_seed0.npz"))
    expected = reference["small/sintel_alley1/flow_iter12"][2:438]  # the reference padded 2 rows top and bottom
    epe = np.linalg.norm(flow.astype(np.float64) - expected, axis=-1)
    assert epe.mean() < 1e-3 and epe.max() < 1e-2, (epe.mean(), epe.max())
    assert read_image(png).shape == (436, 1024, 3)
    printed = capsys.readouterr().out
    gt_epe = np.linalg.norm(flow - read_flo(sintel("frame_0001.flo")), axis=-1).mean()
    assert f"EPE vs {sintel('frame_0001.flo')}: {gt_epe:.3f} px" in printed


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        ([], "no --model given"),
        (["--model", "/nonexistent/raft"], "model directory /nonexistent/raft not found"),
    ],
)
def test_missing_weights_say_where_they_come_from(argv_tail, message, capsys):
    frames = [str(sintel("frame_0001.png")), str(sintel("frame_0002.png"))]
    assert main(frames + argv_tail) == 2
    error = capsys.readouterr().err
    assert message in error and "python -m hkt_jax.convert raft" in error and error.count("\n") == 1


def test_frame_errors_are_one_line(raft_small_dir, tmp_path, capsys):
    chairs = require_shared("flow", "flyingchairs", "0000000-img0.ppm")
    assert main(["--model", str(raft_small_dir), str(sintel("frame_0001.png")), str(chairs)]) == 2
    assert "the frames differ in size: 1024x436 and 512x384" in capsys.readouterr().err
    not_an_image = tmp_path / "frame.png"
    not_an_image.write_text("hello")
    assert main(["--model", str(raft_small_dir), str(not_an_image), str(not_an_image)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["--model", str(raft_small_dir), str(tmp_path / "missing.png"), str(chairs)]) == 2
    error = capsys.readouterr().err
    assert "no such frame" in error and error.count("\n") == 1


def test_padding_is_centred_replicate():
    frame = np.arange(5 * 3 * 3, dtype=np.float32).reshape(5, 3, 3)
    padded, region = pad_to_multiple_of_8(frame)
    assert padded.shape == (8, 8, 3) and region == (1, 2, 5, 3)
    np.testing.assert_array_equal(padded[1:6, 2:5], frame)
    np.testing.assert_array_equal(padded[0, 0], frame[0, 0])  # corners replicate
    np.testing.assert_array_equal(padded[7, 7], frame[4, 2])


def test_flo_round_trip_is_exact(tmp_path):
    flow = np.random.default_rng(0).normal(scale=20, size=(7, 11, 2)).astype(np.float32)
    write_flo(tmp_path / "a.flo", flow)
    data = (tmp_path / "a.flo").read_bytes()
    assert np.frombuffer(data[:4], "<f4")[0] == np.float32(FLO_MAGIC) and len(data) == 12 + 7 * 11 * 8
    np.testing.assert_array_equal(read_flo(tmp_path / "a.flo"), flow)


def test_flo_errors_name_the_file(tmp_path):
    (tmp_path / "magic.flo").write_bytes(np.array([1.0, 0, 0], "<f4").tobytes())
    with pytest.raises(ValueError, match="magic.flo: not a .flo file"):
        read_flo(tmp_path / "magic.flo")
    write_flo(tmp_path / "short.flo", np.zeros((4, 4, 2), np.float32))
    (tmp_path / "short.flo").write_bytes((tmp_path / "short.flo").read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"short.flo: .flo header says 4x4 \(140 bytes\) but the file has 136"):
        read_flo(tmp_path / "short.flo")


def test_colour_wheel_is_middlebury():
    wheel = make_colorwheel()
    assert wheel.shape == (55, 3)
    # Baker et al.: red -> yellow (15), yellow -> green (6), green -> cyan (4), cyan -> blue (11), ...
    np.testing.assert_array_equal(
        wheel[[0, 15, 21, 25, 36, 49]],
        [[255, 0, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255], [255, 0, 255]],
    )
    flow = np.array([[[0.0, 0.0], [-2.0, 0.0], [0.0, -2.0], [1.0, 0.0]]], np.float32)
    colors = flow_to_color(flow)
    assert colors[0, 0].tolist() == [255, 255, 255]  # no motion: white
    assert colors[0, 1].tolist() == [0, 209, 255]  # left, full saturation: wheel[27] (cyan-blue)
    assert colors[0, 3].tolist() == [
        255,
        127,
        127,
    ]  # right (wheel[0], red) at half the largest magnitude: half saturated
