"""Every fenced ```python block of README.md and docs/*.md runs as written (one test per block, id FILE:LINE).

A block that must not run here says why in an HTML comment on the line just before its fence, which a
reader of the markdown source sees too: ``<!-- not run: needs ../shared/data -->``, or a comment naming
the test that runs it (``<!-- the PyTorch snippet below is run by tests/test_export_torch.py -->``).
Those are skipped with that reason (``-rs`` lists them). The rest run in one process, each in a fresh
namespace, from a folder holding what the docs' blocks open: a tiny exported child at
``workdirs/smoke/export/child`` (a random-init ResNet-8, no training) and its three deployment exports
``child.jaxexport``, ``child.onnx`` and ``deploy/child.pt`` (made when a block names them).
"""

from __future__ import annotations

import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from hkt_jax.convert.__main__ import main as convert
from tests.conftest import REPO_ROOT
from tests.deploy_workdirs import make_workdir

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$")
MARK = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")
CHILD = "workdirs/smoke/export/child"
# File a block opens -> (export subcommand, modules it needs); CHILD itself is always there.
EXPORTS = {
    "child.jaxexport": ("export-stablehlo", ()),
    "child.onnx": ("export-onnx", ("torch", "onnx", "onnxruntime")),
    "deploy/child.pt": ("export-torch", ("torch",)),
}


def python_blocks() -> list[tuple[str, str, str | None]]:
    """(FILE:LINE of the fence, code, why it is not run here or None) for each ```python block."""
    blocks = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        index = 0
        while index < len(lines):
            if FENCE.match(lines[index]):
                end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
                mark = MARK.match(lines[index - 1]) if index else None
                reason = mark.group(1) if mark and ("not run" in mark.group(1) or "run by" in mark.group(1)) else None
                label = f"{page.relative_to(REPO_ROOT).as_posix()}:{index + 1}"
                blocks.append((label, "\n".join(lines[index + 1 : end]) + "\n", reason))
                index = end
            index += 1
    return blocks


BLOCKS = python_blocks()


def test_blocks_are_found_and_the_skipped_ones_say_why():
    assert len(BLOCKS) >= 8, [label for label, _, _ in BLOCKS]
    for label, _, reason in BLOCKS:
        assert reason is None or len(reason) > len("not run: "), (label, reason)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The folder the blocks run in, with the tiny exported child (exports are added by ``_provide``)."""
    root = tmp_path_factory.mktemp("docs")
    workdir = make_workdir(root / "made", "cifar_resnet")
    shutil.copytree(workdir / "export" / "child", root / CHILD)
    (root / "workdirs" / "smoke" / "config.json").write_text((workdir / "config.json").read_text())
    return root


def _provide(sandbox: Path, code: str) -> None:
    for name, (command, modules) in EXPORTS.items():
        if name in code and not (sandbox / name).exists():
            for module in modules:
                pytest.importorskip(module, reason=f"{name} needs {module}")
            src = str(sandbox / "workdirs" / "smoke")
            assert convert([command, "--src", src, "--out", str(sandbox / name)]) == 0


@pytest.mark.parametrize("label, code, reason", BLOCKS, ids=[label for label, _, _ in BLOCKS])
def test_docs_python_block_runs(label, code, reason, sandbox, monkeypatch):
    if reason is not None:
        pytest.skip(f"{label}: {reason}")
    _provide(sandbox, code)
    monkeypatch.chdir(sandbox)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a block may put its own folder first
    module = types.ModuleType("docs_block")  # a real module: classes a block defines (Flax modules) need one
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, label, "exec"), module.__dict__)
