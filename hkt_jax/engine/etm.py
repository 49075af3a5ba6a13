"""The ETM triad's Extractor and Transfer as Linen modules (paper Fig. 2); its Mixture is ``ga.etm_mix``.

* ``Extractor`` picks what a giving stage hands over: one leaf of its output
  pytree, or several leaves joined by channel concatenation or by sum.
* ``Transfer`` aligns it with the receiving activation: a 1x1 convolution when
  the channel counts differ, bilinear resizing when the spatial sizes differ,
  and nothing at all (no parameters) when the shapes already match.
* The Mixture fuses it into the receiver with Genetic Attention (Eq. 3): ``hkt_jax.engine.ga.etm_mix``,
  a function (it has no parameters), which the HKT engine calls.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


COMBINES = ("single", "concat", "sum")


def _path_parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def get_leaf(tree: Any, path: str) -> Any:
    """``tree`` at ``path`` ("" = the whole tree, "a/b" = tree["a"]["b"], "0" = tree[0])."""
    node = tree
    for part in _path_parts(path):
        try:
            node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ValueError(
                f"stage output has no leaf {path!r} (failed at {part!r}); its structure is "
                f"{jax.tree.map(lambda a: tuple(getattr(a, 'shape', ())), tree)}"
            ) from None
    return node


def set_leaf(tree: Any, path: str, value: Any) -> Any:
    """A copy of ``tree`` with the node at ``path`` replaced (dicts, lists, tuples)."""
    parts = _path_parts(path)
    if not parts:
        return value
    head, rest = parts[0], "/".join(parts[1:])
    if isinstance(tree, (list, tuple)):
        index = int(head)
        items = list(tree)
        items[index] = set_leaf(items[index], rest, value)
        return type(tree)(items) if not hasattr(tree, "_fields") else type(tree)(*items)
    updated = dict(tree)
    updated[head] = set_leaf(tree[head], rest, value)
    return type(tree)(updated) if not isinstance(tree, dict) else updated


class Extractor(nn.Module):
    """E(x) = z: which part of a stage's output is inherited. No parameters."""

    paths: Sequence[str] = ("",)
    combine: Literal["single", "concat", "sum"] = "single"

    def __call__(self, stage_output: Any) -> jax.Array:
        if self.combine not in COMBINES:
            raise ValueError(f"Extractor: `combine` must be one of {COMBINES}, got {self.combine!r}")
        leaves = [get_leaf(stage_output, p) for p in self.paths]
        if not leaves:
            raise ValueError("Extractor: `paths` is empty; name at least one leaf ('' = the whole output)")
        if self.combine == "single":
            if len(leaves) != 1:
                raise ValueError(f"Extractor: combine='single' takes one path, got {list(self.paths)}")
            return leaves[0]
        shapes = [tuple(leaf.shape) for leaf in leaves]
        if self.combine == "concat":
            if len({s[:-1] for s in shapes}) != 1:
                raise ValueError(f"Extractor: concat needs equal shapes except channels, got {shapes}")
            return jnp.concatenate(leaves, axis=-1)
        if len(set(shapes)) != 1:
            raise ValueError(f"Extractor: sum needs equal shapes, got {shapes}")
        return sum(leaves[1:], leaves[0])


class Transfer(nn.Module):
    """tau = T(z): project ``z`` to the receiver's channels and spatial size.

    ``like`` is the receiving activation (only its shape is read). Channel
    projection is a 1x1 convolution (a Dense on the channel axis); resizing is
    bilinear with half-pixel centres, as ``F.interpolate(align_corners=False)``.
    Whichever of the two shrinks the tensor more runs first. It computes in the receiver's dtype
    (the run's compute dtype; its parameters stay float32).
    """

    @nn.compact
    def __call__(self, z: jax.Array, like: jax.Array) -> jax.Array:
        if z.ndim != like.ndim or z.shape[0] != like.shape[0]:
            raise ValueError(
                f"Transfer: giving features {tuple(z.shape)} and receiving features {tuple(like.shape)} must "
                "have the same rank and batch size (B, *spatial, C)"
            )
        out_channels = like.shape[-1]
        target_spatial = tuple(like.shape[1:-1])
        needs_projection = z.shape[-1] != out_channels
        needs_resize = tuple(z.shape[1:-1]) != target_spatial

        def project(x):
            return nn.Dense(out_channels, dtype=like.dtype, name="proj")(x) if needs_projection else x

        def resize(x):
            if not needs_resize:
                return x
            shape = (x.shape[0], *target_spatial, x.shape[-1])
            return jax.image.resize(x, shape, method="linear", antialias=False).astype(x.dtype)

        if needs_resize and math.prod(target_spatial) < math.prod(z.shape[1:-1]):
            return project(resize(z))
        return resize(project(z))
