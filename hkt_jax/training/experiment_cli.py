"""The experiment command line every entry point shares (``python -m experiments.cifar_hkt`` and its kin).

An entry point is a few lines, like flax's examples: it names its command, its help text and its
config family, and hands ``argv`` to ``main`` here::

    COMMAND = experiment_cli.Command("python -m experiments.flow_hkt", __doc__, config_prefix="flow_",
                                     default_config="chairs")

    def main(argv=None) -> int:
        return experiment_cli.main(COMMAND, argv)

``main`` parses the options and ``key=value`` overrides, loads the config (a family's entry point
takes ``--config smoke`` for ``experiments/configs/flow_smoke.py``), joins a multi-host job when
asked, runs ``hkt_jax.training.experiment.run`` under ``faults.main_guard`` and returns its exit
code, so no entry point copies any of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pkgutil
import sys
from collections.abc import Sequence

import jax

from hkt_jax.runtime.compile_cache import enable_compile_cache
from hkt_jax.runtime.malloc_tuning import tune_malloc_for_xla
from hkt_jax.training import faults
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.experiment import run
from hkt_jax.training.sharding import initialize_distributed

CONFIG_PACKAGE = "experiments.configs"  # what load_config reads; named, never imported here at module level
# Files in the config folder that are not one run's config: helpers and grids (``experiments.compare``).
NOT_RUN_CONFIGS = ("_", "grid_")

COMMON_HELP = """\
Any config field can be overridden by its dotted path, e.g. ``method=child train.steps=500``.
Rerunning with the same workdir resumes. Errors and early stops end in one line and an exit code
(``hkt_jax.training.faults``: 2 bad input, 3 non-finite loss, 4 failed save, 130 Ctrl-C, 143 SIGTERM);
``--debug`` shows tracebacks. Compiled programs are kept for the next run in
``~/.cache/hkt_jax/jax_compilation_cache`` (``$HKT_JAX_COMPILE_CACHE``; ``--no_compile_cache`` or
``HKT_JAX_COMPILE_CACHE=0`` turns that off). On CPU, glibc is told to reuse freed memory
(``hkt_jax.runtime.malloc_tuning``; ``HKT_JAX_MALLOC_TUNING=0`` turns that off)."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One experiment entry point: how it is called, its help text and the configs it runs."""

    prog: str  # the usage line's command, e.g. "python -m experiments.flow_hkt"
    doc: str | None  # the entry point's own description (its module docstring)
    config_prefix: str = ""  # its config family: a file-name prefix in experiments/configs ("" = every config)
    default_config: str = "default"


def config_name(name: str, prefix: str) -> str:
    """``smoke`` -> ``flow_smoke`` for prefix ``flow_``; names already carrying the prefix stay."""
    return name if name.startswith(prefix) else prefix + name


def available_configs(prefix: str = "") -> list[str]:
    """The config names an entry point with this family prefix takes (without the prefix), sorted."""
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    names = (module.name for module in pkgutil.iter_modules(spec.submodule_search_locations))
    return sorted(
        name[len(prefix) :] for name in names if name.startswith(prefix) and not name.startswith(NOT_RUN_CONFIGS)
    )


def resolve_config_name(command: Command, name: str) -> str:
    """The config file's name for ``--config name``; an unknown one is a ``UserError`` listing the known ones."""
    known = available_configs(command.config_prefix)
    if name in known or name.removeprefix(command.config_prefix) in known:
        return config_name(name, command.config_prefix)
    where = f"experiments/configs/{command.config_prefix}<NAME>.py"
    raise faults.UserError(
        f"unknown config {name!r} for {command.prog}: the configs ({where}) are "
        f"{', '.join(known) or 'none (is the experiments package importable?)'}"
    )


def build_parser(command: Command) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command.prog,
        description=command.doc,
        epilog=COMMON_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    family = f"experiments/configs/{command.config_prefix}<NAME>.py"
    parser.add_argument(
        "--config",
        default=command.default_config,
        metavar="NAME",
        help=f"config NAME of {family}: {', '.join(available_configs(command.config_prefix))} (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir", default=None, metavar="DIR", help="run directory (default: workdirs/<config file name>)"
    )
    parser.add_argument(
        "--parent_ckpt",
        default=None,
        metavar="DIR",
        help="parent model checkpoint dir (from python -m hkt_jax.convert, or a run's export/child)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.steps=100 hkt.lam=0.5")
    faults.add_common_arguments(parser)
    multihost = parser.add_argument_group("multi-host (jax.distributed); a single process needs none of these")
    multihost.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with cluster auto-detection (TPU pod slice, SLURM, ...)",
    )
    multihost.add_argument("--coordinator_address", default=None, help="manual launch: HOST:PORT of process 0")
    multihost.add_argument("--num_processes", type=int, default=None, help="manual launch: number of processes")
    multihost.add_argument("--process_id", type=int, default=None, help="manual launch: this process's index")
    return parser


def parse_args(command: Command, argv: Sequence[str]) -> argparse.Namespace:
    return build_parser(command).parse_intermixed_args(list(argv))  # options may come between the overrides


def train(command: Command, args: argparse.Namespace) -> int:
    """The guarded body of ``main``: config, multi-host start, the run; prints the summary (process 0)."""
    tune_malloc_for_xla()  # before JAX runs anything: reuse freed memory (see hkt_jax/runtime/malloc_tuning.py)
    name = resolve_config_name(command, args.config)
    overrides = list(args.overrides) + ([f"parent_ckpt={args.parent_ckpt}"] if args.parent_ckpt else [])
    config = faults.as_user_error(lambda: apply_overrides(load_config(name), overrides))
    faults.as_user_error(
        lambda: initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed
        )
    )
    enable_compile_cache(not args.no_compile_cache)  # before the first compilation; the start-up block names it
    summary = run(config, args.workdir or f"workdirs/{name}", allow_config_change=args.allow_config_change)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
    return 0


def main(command: Command, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), train, and return the exit code (``hkt_jax.training.faults``)."""
    args = parse_args(command, sys.argv[1:] if argv is None else argv)
    return faults.main_guard(lambda: train(command, args), debug=args.debug)
