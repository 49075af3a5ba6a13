"""CIFAR HKT experiment: ``python -m experiments.cifar_hkt [--config NAME] [--workdir DIR] [key=value ...]``.

Configs live in ``experiments/configs`` (default: the paper's setting,
reference: the authors' released code, smoke: seconds on a CPU). Any config
field can be overridden by its dotted path, e.g. ``method=child train.steps=500``.
Rerunning with the same workdir resumes. Errors and early stops end in one line and an
exit code (``hkt_jax.training.faults``: 2 bad input, 3 non-finite loss, 4 failed save, 130 Ctrl-C,
143 SIGTERM); ``--debug`` shows tracebacks. Compiled programs are kept for the next run in
``~/.cache/hkt_jax/jax_compilation_cache`` (``$HKT_JAX_COMPILE_CACHE``; ``--no_compile_cache`` or
``HKT_JAX_COMPILE_CACHE=0`` turns that off). On CPU, glibc is told to reuse freed memory
(``hkt_jax.runtime.malloc_tuning``; ``HKT_JAX_MALLOC_TUNING=0`` turns that off).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from hkt_jax.training import faults
from hkt_jax.runtime.compile_cache import enable_compile_cache
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.experiment import run
from hkt_jax.runtime.malloc_tuning import tune_malloc_for_xla
from hkt_jax.training.sharding import initialize_distributed


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.cifar_hkt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="config name in experiments/configs (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="run directory (default: workdirs/<config>)")
    parser.add_argument("--parent_ckpt", default=None, help="parent model checkpoint dir (from python -m hkt_jax.convert)")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.steps=100 hkt.lam=0.5")
    faults.add_common_arguments(parser)
    multihost = parser.add_argument_group("multi-host (jax.distributed); a single process needs none of these")
    multihost.add_argument("--distributed", action="store_true",
                           help="jax.distributed.initialize() with cluster auto-detection (TPU pod slice, SLURM, ...)")
    multihost.add_argument("--coordinator_address", default=None, help="manual launch: HOST:PORT of process 0")
    multihost.add_argument("--num_processes", type=int, default=None, help="manual launch: number of processes")
    multihost.add_argument("--process_id", type=int, default=None, help="manual launch: this process's index")
    return parser.parse_intermixed_args(argv)  # options may come between the key=value overrides


def _train(args) -> int:
    tune_malloc_for_xla()  # before JAX runs anything: reuse freed memory (see hkt_jax/runtime/malloc_tuning.py)
    overrides = list(args.overrides) + ([f"parent_ckpt={args.parent_ckpt}"] if args.parent_ckpt else [])
    config = faults.as_user_error(lambda: apply_overrides(load_config(args.config), overrides))
    faults.as_user_error(lambda: initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                                     auto=args.distributed))
    enable_compile_cache(not args.no_compile_cache)  # before the first compilation; the start-up block names it
    summary = run(config, args.workdir or f"workdirs/{args.config}", allow_config_change=args.allow_config_change)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return faults.main_guard(lambda: _train(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
