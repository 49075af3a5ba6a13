"""Newcomer mistakes on the command lines (wrong paths, a wrong --grid, --seeds, --out) get one line naming the
fix, not a traceback. Nothing here trains or converts: each mistake is caught before any work."""

from __future__ import annotations

import json

import pytest

from experiments import compare, plot_metrics
from hkt_jax.convert.__main__ import main as convert
from hkt_jax.grids import comparison
from hkt_jax.grids.comparison import Grid

GRID = Grid(experiment="tests.fake_experiment", config="unused", seeds=(0, 1), variants={"base": ()})


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    (line,) = captured.err.strip().splitlines()
    return line


# --- python -m hkt_jax.convert ---------------------------------------------------------------------------------


def test_convert_names_an_out_it_cannot_write(tmp_path, a_file, capsys):
    src = tmp_path / "r56.th"
    assert convert(["resnet", "--src", str(src), "--depth", "56", "--out", str(a_file / "r56")]) == 1
    assert error_line(capsys) == (
        f"python -m hkt_jax.convert resnet: error: --out {a_file / 'r56'}: {a_file} is a "
        "file, not a folder: choose an --out outside it"
    )
    assert convert(["raft", "--src", str(src), "--out", str(a_file)]) == 1
    assert (
        f"--out {a_file}: is a file; expected a new (or an old, to overwrite) model checkpoint directory"
        in error_line(capsys)
    )
    assert convert(["export-torch", "--src", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert error_line(capsys).endswith(
        f"--out {tmp_path}: is a directory; expected a file name, e.g. --out {tmp_path / 'child.pt'}"
    )
    assert convert(["export-stablehlo", "--src", str(tmp_path), "--out", str(a_file / "x" / "child")]) == 1
    assert f"{a_file} is a file, not a folder" in error_line(capsys)


def test_convert_names_a_missing_or_directory_src(tmp_path, capsys):
    for command in (["resnet", "--depth", "20"], ["raft"]):
        assert (
            convert([command[0], "--src", str(tmp_path / "nope.th"), *command[1:], "--out", str(tmp_path / "o")]) == 1
        )
        assert error_line(capsys).endswith(f"error: no such checkpoint file: {tmp_path / 'nope.th'}")
    converted = tmp_path / "r56"  # an hkt_jax model checkpoint dir given where a PyTorch file belongs
    converted.mkdir()
    (converted / "model.json").write_text("{}")
    assert convert(["resnet", "--src", str(converted), "--depth", "56", "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys).endswith(
        f"{converted} is a directory, not a PyTorch checkpoint file (.th/.pt/.pth): "
        "its model.json makes it an hkt_jax model checkpoint already, to use as is "
        "(parent_ckpt=)"
    )
    assert not (tmp_path / "o").exists()


# --- python -m experiments.compare -----------------------------------------------------------------------------


def test_unknown_grid_lists_the_grids():
    assert "cifar_cpu" in comparison.grid_names() and "smoke_grid" in comparison.grid_names()
    with pytest.raises(
        ValueError,
        match=r"unknown grid 'nope': no experiments/configs/grid_nope.py \(grids: .*"
        r"cifar_cpu, .*smoke_grid",
    ):
        comparison.load_grid("nope")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--seeds", "0,x"], "error: --seeds 0,x: expected comma-separated integers, e.g. --seeds 0,1"),
        (
            ["--report_only"],
            "error: --root {root}: no such folder, so no runs to report: give the --root the grid ran "
            "in, or drop --report_only to run it",
        ),
        (["--parent_ckpt", "{tmp}/r56"], "error: --parent_ckpt='{tmp}/r56': no such directory"),
        (["--pack", "{file}"], "error: --pack {file}: is a file; choose an empty or new folder"),
    ],
)
def test_compare_refuses_before_running_anything(tmp_path, a_file, monkeypatch, capsys, arguments, message):
    monkeypatch.setattr(comparison, "load_grid", lambda name: GRID)
    root = tmp_path / "runs"
    fill = {"root": root, "tmp": tmp_path, "file": a_file}
    assert compare.main(["--grid", "g", "--root", str(root), *(a.format(**fill) for a in arguments)]) == 2
    assert error_line(capsys) == message.format(**fill)
    assert not root.exists(), "nothing ran"


def test_compare_names_a_root_or_out_that_is_in_a_files_way(tmp_path, a_file, monkeypatch, capsys):
    monkeypatch.setattr(comparison, "load_grid", lambda name: GRID)
    assert compare.main(["--grid", "g", "--root", str(a_file), "--dry_run"]) == 2
    assert error_line(capsys) == (
        f"error: --root {a_file}: is a file; expected the folder the grid's runs live (or will live) in"
    )
    (tmp_path / "runs").mkdir()
    out = a_file / "report"
    assert compare.main(["--grid", "g", "--root", str(tmp_path / "runs"), "--report_only", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}: cannot write the report there ({a_file} is a "
        "file, not a folder); choose another --out, then rerun with "
        "--report_only"
    )


# --- python -m experiments.plot_metrics ------------------------------------------------------------------------


def test_plot_metrics_names_a_bad_out_or_a_broken_run_file(tmp_path, a_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + '\n{"step": 2, "lo')
    assert plot_metrics.main([str(run), "--out", str(tmp_path)]) == 2
    assert error_line(capsys) == (
        f"error: --out {tmp_path}: is a directory; expected an image file name, e.g. --out {tmp_path / 'metrics.png'}"
    )
    assert plot_metrics.main([str(run), "--out", str(a_file / "m.png")]) == 2
    assert (
        error_line(capsys) == f"error: --out {a_file / 'm.png'}: {a_file} is a file, not a folder: choose an "
        "--out outside it"
    )
    out = str(tmp_path / "m.png")
    assert plot_metrics.main([str(run), "--out", out]) == 2
    assert error_line(capsys).startswith(f"error: {run / 'metrics.jsonl'}: a line is not JSON (")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    (run / "config.json").write_text("{cut")
    assert plot_metrics.main([str(run), "--out", out]) == 2
    assert error_line(capsys).endswith("; move it aside to plot the run without it")


def test_pack_refuses_a_file_as_its_folder(tmp_path, a_file):
    from hkt_jax.grids import pack as grid_pack

    (tmp_path / "runs").mkdir()
    with pytest.raises(grid_pack.PackError, match=f"--pack {a_file}: is a file; choose an empty or new folder"):
        grid_pack.pack("g", GRID, tmp_path / "runs", a_file, ["base"], [0])
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["runs", a_file.name]), "staging folder removed"
