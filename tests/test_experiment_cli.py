"""The shared experiment command line: each entry point's own usage line and config family."""

from __future__ import annotations

import pytest

from experiments import cifar_hkt, flow_hkt, seg_hkt
from hkt_jax.training import experiment_cli, faults


@pytest.mark.parametrize("entry, name", [(flow_hkt, "flow_hkt"), (seg_hkt, "seg_hkt"), (cifar_hkt, "cifar_hkt")])
def test_help_names_the_entry_point_called(entry, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        entry.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m experiments.{name} ") and "--coordinator_address" in out


def test_unknown_config_lists_the_family_without_its_prefix(capsys):
    assert flow_hkt.main(["--config", "smokey"]) == faults.EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: unknown config 'smokey' for python -m experiments.flow_hkt")
    assert error.endswith("are chairs, cpu, kitti, sintel, smoke, things"), error
    assert "smoke" in experiment_cli.available_configs() and "grid_smoke_grid" not in experiment_cli.available_configs()


def test_a_family_takes_its_names_with_or_without_the_prefix():
    assert experiment_cli.resolve_config_name(seg_hkt.COMMAND, "smoke") == "seg_smoke"
    assert experiment_cli.resolve_config_name(seg_hkt.COMMAND, "seg_smoke") == "seg_smoke"
    assert experiment_cli.resolve_config_name(cifar_hkt.COMMAND, "seg_smoke") == "seg_smoke"
    assert experiment_cli.parse_args(flow_hkt.COMMAND, ["method=child"]).config == "chairs"
