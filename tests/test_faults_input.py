"""Bad input is rejected at start-up: exit code 2, one line naming the key or path, nothing written, no
traceback (``--debug`` shows it); bad data files are named; untrusted PyTorch files are refused."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import cifar_hkt
from hkt_jax.training import checkpoint, factories, faults, preflight
from hkt_jax.data.image_folder import load_image_folder
from hkt_jax.data.sources import checked_image_set
from tests.conftest import REPO_ROOT

TOY = ["--config", "toy_segmentation"]  # method=hkt without parent_ckpt: would train a parent first
SMOKE_TINY = [
    "--config",
    "smoke",
    "child.depth=8",
    "parent.depth=8",
    "method=child",
    "train.batch_size=16",
    "train.steps=2",
    "data.validation_size=4",
]


def _image_folder(root: Path, classes=("apple", "mango"), per_class=2, splits=("train", "test")) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.jpg", quality=90
                )
    return root


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command-line arguments, what the one line must name)."""
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()
    truncated = _truncate(_image_folder(tmp / "folder") / "train" / "mango" / "1.jpg")
    _image_folder(tmp / "no_mango_in_test", classes=("apple",), splits=("test",))
    _image_folder(tmp / "no_mango_in_test", classes=("apple", "mango"), splits=("train",))
    workdir = ["--workdir", str(tmp / "run")]
    return {
        "hkt.lam of the run after its parent": ([*TOY, *workdir, "hkt.lam=2"], "hkt.lam=2"),
        "hkt.alphas": ([*TOY, *workdir, "hkt.alphas=0.5,0.1,0.4"], "hkt.alphas"),
        "train.batch_size": ([*TOY, *workdir, "train.batch_size=0"], "train.batch_size=0"),
        "train.steps type": ([*TOY, *workdir, "train.steps=ten"], "train.steps='ten'"),
        "optim.learning_rate": ([*TOY, *workdir, "optim.learning_rate=-1"], "optim.learning_rate=-1.0"),
        "checkpoint minutes": ([*TOY, *workdir, "train.checkpoint_every_minutes=-5"], "train.checkpoint_every_minutes"),
        "unknown key": ([*TOY, *workdir, "train.stepz=3"], "unknown key 'train.stepz'"),
        "unknown config": (["--config", "nope", *workdir], "unknown config 'nope'"),
        "parent_ckpt missing": ([*TOY, *workdir, "--parent_ckpt", str(tmp / "nowhere")], "nowhere"),
        "parent_ckpt not a model": (
            [*TOY, *workdir, "--parent_ckpt", str(tmp / "empty_dir")],
            "empty_dir': not a model checkpoint",
        ),
        "parent_ckpt a file": ([*TOY, *workdir, "--parent_ckpt", str(tmp / "a_file")], "a_file': is a file"),
        "workdir a file": ([*TOY, "--workdir", str(tmp / "a_file")], "a_file: is a file"),
        "workdir under a file": ([*TOY, "--workdir", str(tmp / "a_file" / "run")], "a_file is a file"),
        "data.path missing": ([*TOY, *workdir, f"data.path={tmp / 'no_data'}"], "no_data"),
        "truncated jpeg": (
            [*SMOKE_TINY, *workdir, "data.source=image_folder", f"data.path={tmp / 'folder'}"],
            f"{truncated}: unreadable image",
        ),
        "class missing from test": (
            [*SMOKE_TINY, *workdir, "data.source=image_folder", f"data.path={tmp / 'no_mango_in_test'}"],
            "no class folders for ['mango']",
        ),
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _bad_inputs(tmp)


@pytest.mark.parametrize(
    "name",
    [
        "hkt.lam of the run after its parent",
        "hkt.alphas",
        "train.batch_size",
        "train.steps type",
        "optim.learning_rate",
        "checkpoint minutes",
        "unknown key",
        "unknown config",
        "parent_ckpt missing",
        "parent_ckpt not a model",
        "parent_ckpt a file",
        "workdir a file",
        "workdir under a file",
        "data.path missing",
        "truncated jpeg",
        "class missing from test",
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(bad_inputs, capsys, name):
    tmp, cases = bad_inputs
    argv, named = cases[name]
    before = sorted(p for p in tmp.rglob("*"))
    start = time.perf_counter()
    assert cifar_hkt.main(argv) == faults.EXIT_USAGE
    assert time.perf_counter() - start < 60
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted(p for p in tmp.rglob("*")) == before  # no workdir, no sub-folder, nothing


def test_debug_shows_the_traceback(bad_inputs):
    tmp, cases = bad_inputs
    with pytest.raises(faults.UserError, match="hkt.lam=2"):
        cifar_hkt.main([*cases["hkt.lam of the run after its parent"][0], "--debug"])


def test_interrupt_outside_the_training_steps_is_one_line(capsys):
    def ctrl_c():
        raise KeyboardInterrupt

    assert faults.main_guard(ctrl_c) == faults.EXIT_SIGINT
    assert faults.main_guard(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5)) == faults.EXIT_SIGTERM
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("rerun the same command to continue" in line for line in lines)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard put the previous handler back


def test_hkt_lam_fails_in_seconds_as_a_process_before_any_parent_is_trained(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cifar_hkt", *TOY, "--workdir", str(tmp_path / "w"), "hkt.lam=2"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "hkt.lam=2" in result.stderr
    assert not (tmp_path / "w").exists()
    assert time.perf_counter() - start < 60  # imports only: no parent was trained


def test_unwritable_workdir_and_full_disk_are_refused_at_start_up(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    preflight.check_workdir(workdir)
    assert not workdir.exists()  # checking creates nothing

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(preflight.tempfile, "TemporaryFile", read_only)
        with pytest.raises(faults.UserError, match=f"cannot write in {tmp_path} \\(Read-only file system\\)"):
            preflight.check_workdir(workdir)
    with monkeypatch.context() as patch:
        patch.setattr(preflight.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 2**20})())
        with pytest.raises(faults.UserError, match="only 1 MiB free"):
            preflight.check_workdir(workdir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(faults.UserError, match="cannot write in"):
            preflight.check_workdir(tmp_path / "run")
    finally:
        tmp_path.chmod(0o755)


# -- bad data -----------------------------------------------------------------------------------


def test_truncated_jpeg_is_named_or_skipped_and_counted(tmp_path):
    truncated = _truncate(_image_folder(tmp_path) / "train" / "apple" / "1.jpg")
    with pytest.raises(ValueError, match="unreadable image") as error:
        load_image_folder(tmp_path, "train")
    assert str(truncated) in str(error.value)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        images = load_image_folder(tmp_path, "train", skip_unreadable=True)
    assert len(images) == 3 and images.skipped_files == (str(truncated),)
    assert images.labels.tolist() == [0, 1, 1]


def test_empty_class_folder_and_labels_out_of_range(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "train" / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"class folders \['zebra'\] hold no"):
        load_image_folder(tmp_path, "train")
    with pytest.raises(ValueError, match="label 2 is out of range for 2 classes"):
        checked_image_set(np.zeros((3, 32, 32, 3), np.uint8), np.array([0, 1, 2]), "x", ("a", "b"))
    with pytest.raises(ValueError, match="labels must be non-negative, found -1"):
        checked_image_set(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, -1]), "x")


# -- untrusted PyTorch files --------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_callable_and_garbage_are_refused(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from hkt_jax.convert import __main__ as convert_cli
    from hkt_jax.convert.raft import load_checkpoint as load_raft
    from hkt_jax.convert.resnet import load_torch_checkpoint, resnet_from_torch
    from hkt_jax.convert.torch_models import load_exported

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(16, 3, 3, 3)}, "extra": _RunsCode(marker)}, evil)
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"\x80\x02not a checkpoint at all" * 8)
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(100)}, truncated)
    _truncate(truncated)

    for load in (load_torch_checkpoint, load_raft, load_exported, lambda p: resnet_from_torch(p, depth=20)):
        with pytest.raises(ValueError, match="refused: the file pickles Python code or objects.*posix.system"):
            load(evil)
        with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
            load(garbage)
        with pytest.raises(ValueError, match="not a PyTorch checkpoint, or a truncated one"):
            load(truncated)
    assert not marker.exists()
    for path in (evil, garbage):
        assert convert_cli.main(["resnet", "--src", str(path), "--depth", "20", "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(path) in err
        assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_a_parent_of_another_task_is_named_by_its_architecture_and_task(tmp_path):
    spec = {
        "arch": "unet",
        "kwargs": {"num_classes": 3, "widths": [8, 16]},
        "metadata": {"data": {"task": "segmentation", "source": "synthetic", "name": "synthetic_ct"}},
    }
    checkpoint.save_model(tmp_path / "unet", {"params": {"w": np.zeros(2, np.float32)}}, spec)
    with pytest.raises(ValueError) as error:
        factories.load_parent(tmp_path / "unet", expected_kwargs={"num_classes": 10}, task="classification")
    assert str(error.value).endswith(
        "is a unet (num_classes=3, widths=[8, 16]) trained for segmentation on synthetic "
        "synthetic_ct data, but this classification run needs a classification parent "
        "with num_classes=10"
    ), error.value
