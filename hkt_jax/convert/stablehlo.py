"""``export-stablehlo``: a child's raw-input inference function serialised with ``jax.export``.

The file is ``jax.export.Exported.serialize()`` with the weights inside as constants, float32, the
batch dimension symbolic (``b``). It runs in any process with jax and numpy, without hkt_jax:

    exported = jax.export.deserialize(bytearray(open("child.jaxexport", "rb").read()))
    logits = exported.call(images_uint8)

Exported for the CPU platform (the convolutions are XLA's own, no custom calls); pass ``platforms``
for others. A JSON description of the inputs and output goes beside it (OUT with ``.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from hkt_jax.convert.deploy import Deployable

BATCH_SYMBOL = "b"
FORMAT = "hkt_jax.export-stablehlo/1"


def export_stablehlo(
    deployable: Deployable, out: str | Path, *, platforms: Sequence[str] | None = ("cpu",)
) -> jax.export.Exported:
    """Serialise ``deployable.apply`` to ``out`` (and its description to ``out`` with ``.json``)."""
    (batch,) = jax.export.symbolic_shape(BATCH_SYMBOL)
    arguments = [
        jax.ShapeDtypeStruct(tuple(batch if n is None else n for n in spec.shape), jnp.dtype(spec.dtype))
        for spec in deployable.inputs
    ]
    exported = jax.export.export(jax.jit(deployable.apply), platforms=platforms)(*arguments)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(exported.serialize())
    description = {
        "format": FORMAT,
        **deployable.describe(),
        "platforms": list(exported.platforms),
        "load": "jax.export.deserialize(bytearray(open(PATH, 'rb').read())).call(*inputs)",
    }
    out.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return exported
