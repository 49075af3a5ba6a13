"""Per-problem experiment commands on top of the one training command line (``experiments.cifar_hkt``).

``python -m experiments.flow_hkt --config smoke`` is ``python -m experiments.cifar_hkt
--config flow_smoke``: a problem's entry point only names its config family (a
file-name prefix in ``experiments/configs``) and its default config, and hands
the rewritten arguments to the shared parser and ``main`` (same options,
overrides, multi-host flags, error handling), so no entry point copies them.
"""

from __future__ import annotations

from collections.abc import Sequence


def config_name(name: str, prefix: str) -> str:
    """``smoke`` -> ``flow_smoke`` for prefix ``flow_``; names already carrying the prefix stay."""
    return name if name.startswith(prefix) else prefix + name


def argv_with_config(argv: Sequence[str], *, prefix: str, default: str, doc: str | None = None) -> list[str]:
    """``argv`` with its ``--config NAME`` (or ``--config=NAME``) naming the family's config, the default one
    when absent; ``-h`` first prints the entry point's own ``doc``."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = config_name(argv[i + 1], prefix)
            return argv
        if arg.startswith("--config="):
            argv[i] = "--config=" + config_name(arg.split("=", 1)[1], prefix)
            return argv
    if doc and any(arg in ("-h", "--help") for arg in argv):
        print(doc)
    return ["--config", config_name(default, prefix), *argv]
