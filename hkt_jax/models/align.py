"""Which parent block feeds which child block: linear CKA and a monotone matching over it.

The paper leaves the stage pairing to the user. Here it is read off the data:
run both networks on the same images, compare every pair of candidate module
outputs with linear CKA (Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited"), and choose K pairs, increasing on both networks,
with the largest summed CKA. The pairs can serve as ``hkt.parent_taps`` /
``hkt.child_taps`` (stages must follow the forward order on both sides, hence
monotone).

CKA and the matching are pure NumPy (float64); ``candidate_paths`` and
``centred_grams`` run a Flax model (``capture_intermediates``) to get the
representations: the outputs of the submodule calls ``available_taps`` lists.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.models.tapped import available_taps


def _as_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected features of shape (examples >= 2, features), got {x.shape}")
    return x


def linear_cka(x, y) -> float:
    """Linear CKA of two representations of the same examples, ``(N, Dx)`` and ``(N, Dy)``.

    Feature-space form on column-centred features: ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``
    (cheaper than the N x N Gram form when the feature counts are small). In [0, 1];
    invariant to orthogonal transforms and isotropic scaling of either input.
    """
    x, y = _as_matrix(x, "linear_cka x"), _as_matrix(y, "linear_cka y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x and y must describe the same examples, got {x.shape[0]} and {y.shape[0]} rows")
    x, y = x - x.mean(0), y - y.mean(0)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if denominator == 0:
        raise ValueError("linear_cka: a representation is constant over the examples (zero variance)")
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator)


def centred_gram(x) -> np.ndarray:
    """``H X X^T H`` (H: the centring matrix) of ``(N, D)`` features in float64, the input of
    ``cka_matrix``; for a Gram matrix computed elsewhere (e.g. in float32 on a device) use ``centre_gram``."""
    x = _as_matrix(x, "centred_gram")
    return centre_gram(x @ x.T)


def centre_gram(gram) -> np.ndarray:
    """Double-centre a Gram matrix ``K`` -> ``H K H`` (float64)."""
    gram = np.asarray(gram, np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"centre_gram: expected a square (N, N) Gram matrix, got {gram.shape}")
    gram = gram - gram.mean(0, keepdims=True)
    return gram - gram.mean(1, keepdims=True)


def cka_matrix(parent_grams, child_grams) -> np.ndarray:
    """CKA between every parent and every child representation, from their centred Grams.

    ``parent_grams``: sequence of P centred ``(N, N)`` Grams (``centred_gram``), ``child_grams``
    C of them -> ``(P, C)`` matrix. Gram form: ``<Kc, Lc>_F / (||Kc||_F ||Lc||_F)``.
    """

    def unit_rows(grams, side):
        rows = np.stack([np.asarray(g, np.float64).ravel() for g in grams])
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError(f"cka_matrix: a {side} representation is constant over the examples (zero variance)")
        return rows / norms

    if not len(parent_grams) or not len(child_grams):
        raise ValueError("cka_matrix: need at least one parent and one child representation")
    return unit_rows(parent_grams, "parent") @ unit_rows(child_grams, "child").T


@dataclasses.dataclass(frozen=True)
class Matching:
    pairs: tuple[tuple[int, int], ...]  # (parent index, child index), increasing on both
    total: float  # summed score of the pairs


def best_totals(scores) -> np.ndarray:
    """``totals[k - 1]``: the largest summed score of k monotone pairs, k = 1 .. min(P, C)."""
    return np.array([_tables(scores)[k][-1, -1] for k in range(1, min(np.shape(scores)) + 1)])


def _tables(scores) -> list[np.ndarray]:
    """``table[k][i, j]``: best sum of k pairs strictly increasing on both sides among the first i
    parent rows and first j child columns (-inf when k pairs do not fit)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"monotone matching: expected a non-empty (parent, child) score matrix, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("monotone matching: the score matrix has non-finite entries")
    rows, cols = scores.shape
    tables = [np.zeros((rows + 1, cols + 1))]
    for _ in range(min(rows, cols)):
        taken = np.full((rows + 1, cols + 1), -np.inf)
        taken[1:, 1:] = tables[-1][:-1, :-1] + scores  # the last pair is exactly (i - 1, j - 1)
        # Best over every last pair (i', j') <= (i, j): a running maximum along both axes.
        tables.append(np.maximum.accumulate(np.maximum.accumulate(taken, axis=0), axis=1))
    return tables


def monotone_pairs(scores, k: int) -> Matching:
    """The k pairs ``(i_1, j_1), ..., (i_k, j_k)`` with ``i_1 < ... < i_k`` and ``j_1 < ... < j_k``
    that maximise the summed score (dynamic programme, O(k P C))."""
    scores = np.asarray(scores, np.float64)
    limit = min(scores.shape) if scores.ndim == 2 else 0
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        raise ValueError(
            f"monotone_pairs: k must be an integer in [1, {limit}] (the shorter side of the "
            f"{scores.shape} matrix), got {k!r}"
        )
    tables = _tables(scores)[: k + 1]
    pairs, i, j = [], scores.shape[0], scores.shape[1]
    while k:
        table = tables[k]
        if table[i, j] == table[i - 1, j]:
            i -= 1
        elif table[i, j] == table[i, j - 1]:
            j -= 1
        else:  # the running maxima copy values exactly, so only a taken pair reaches here
            pairs.append((i - 1, j - 1))
            i, j, k = i - 1, j - 1, k - 1
    pairs.reverse()
    return Matching(tuple(pairs), float(sum(scores[p] for p in pairs)))


def k_by_largest_gap(totals, k_max: int | None = None) -> int:
    """The number of pairs after which one more pair gains least compared with the one before.

    ``gain[k] = totals[k] - totals[k - 1]`` (``gain[1] = totals[1]``) is what the k-th pair adds;
    K = argmax over k in [1, k_max - 1] of ``gain[k] - gain[k + 1]`` (the largest drop in gain;
    the smallest k on ties). ``k_max`` (default: all of ``totals``) caps the pairs considered.
    With one candidate K = 1.
    """
    totals = np.asarray(totals, np.float64)
    k_max = len(totals) if k_max is None else min(k_max, len(totals))
    if totals.ndim != 1 or k_max < 1:
        raise ValueError(
            f"k_by_largest_gap: expected totals for k = 1, 2, ... and k_max >= 1, got {totals.shape}, k_max={k_max}"
        )
    if k_max == 1:
        return 1
    gains = np.diff(totals[:k_max], prepend=0.0)
    return int(np.argmax(gains[:-1] - gains[1:])) + 1


# -- representations of a Flax model, one per candidate submodule call ---------------------------


def candidate_paths(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    *,
    max_depth: int = 1,
    include: str | None = None,
    train_arg: str | None = "train",
) -> dict[str, tuple[int, ...]]:
    """Submodule paths whose output can end a stage -> output shape (``images``: a small batch),
    in the order the forward returns from them (the order taps must be listed in).

    From ``available_taps``: paths called once per forward (``Tapped`` refuses the
    others), at most ``max_depth`` levels deep (0: any depth), matching the regular
    expression ``include`` (``re.search``) when given, whose output is one array with
    a batch axis (feature maps, pooled vectors), leaving out the model's own output
    (a stage boundary there leaves the last stage empty).
    """
    kwargs = {train_arg: False} if train_arg else {}
    counts = available_taps(model, images, **kwargs)
    paths = [
        p
        for p, n in counts.items()
        if n == 1 and (max_depth <= 0 or p.count("/") < max_depth) and (include is None or re.search(include, p))
    ]
    returned: list[str] = []

    def record_return(next_fun, args, call_kwargs, context):
        out = next_fun(*args, **call_kwargs)
        if context.method_name == "__call__":
            returned.append("/".join(context.module.path))
        return out

    with nn.intercept_methods(record_return):
        output, captured = _capture(model, variables, images, paths, kwargs)
    shapes = {}
    for path in sorted(paths, key=returned.index):
        value = captured.get(path)
        if (
            isinstance(value, jax.Array)
            and value.ndim >= 2
            and value.shape[0] == len(images)
            and not (value.shape == output.shape and bool(jnp.array_equal(value, output)))
        ):
            shapes[path] = tuple(value.shape[1:])
    if not shapes:
        raise ValueError(
            f"{type(model).__name__}: no submodule output can end a stage (paths called once, "
            f"depth <= {max_depth or 'any'}, include={include!r}: {sorted(paths)})"
        )
    return shapes


def nested_paths(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs (inner, outer) among ``paths`` where one submodule runs inside the other: ``Tapped``
    refuses such taps (the outer one's stage would contain the inner one's boundary)."""
    return [(inner, outer) for inner in paths for outer in paths if inner != outer and inner.startswith(outer + "/")]


def _capture(model, variables, images, paths, kwargs):
    wanted = set(paths)

    def keep(module, method_name):
        return method_name == "__call__" and "/".join(module.path) in wanted

    output, state = model.apply(variables, images, capture_intermediates=keep, **kwargs)
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if key == "__call__":
                flat["/".join(prefix)] = value[0] if len(value) == 1 else value
            else:
                walk(value, (*prefix, key))

    walk(state.get("intermediates", {}), ())
    return output, flat


def flatten_features(value: jax.Array, max_features: int) -> jax.Array:
    """``(B, *spatial, C)`` -> ``(B, features)``: the whole map when it has at most ``max_features``
    entries, else average-pooled over square windows (the smallest window that fits; global
    average pooling when none divides the spatial size)."""
    batch, *spatial, channels = value.shape
    if not spatial or np.prod(value.shape[1:]) <= max_features:
        return value.reshape(batch, -1)
    for window in range(2, max(spatial) + 1):
        pooled_size = np.prod(spatial) // window ** len(spatial) * channels
        if all(s % window == 0 for s in spatial) and pooled_size <= max_features:
            shape = [batch] + [d for s in spatial for d in (s // window, window)] + [channels]
            pooled = value.reshape(shape).mean(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))
            return pooled.reshape(batch, -1)
    return value.mean(axis=tuple(range(1, 1 + len(spatial))))


def centred_grams(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    paths: Sequence[str],
    *,
    batch_size: int = 128,
    max_features: int = 16384,
    train_arg: str | None = "train",
) -> dict[str, np.ndarray]:
    """The centred ``(N, N)`` linear Gram matrix of each path's (flattened) output over ``images``.

    The forward runs in batches (jit-compiled, inference mode); each path's features are
    kept as float32 until its Gram (one float32 matmul at full precision) is taken.
    """
    kwargs = {train_arg: False} if train_arg else {}

    @jax.jit
    def features(variables, batch):
        _, captured = _capture(model, variables, batch, paths, kwargs)
        return {p: flatten_features(captured[p].astype(jnp.float32), max_features) for p in paths}

    chunks: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    for start in range(0, len(images), batch_size):
        for path, value in features(variables, jnp.asarray(images[start : start + batch_size])).items():
            chunks[path].append(np.asarray(value))
    gram = jax.jit(lambda x: jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST))
    grams = {}
    for path in paths:
        grams[path] = centre_gram(np.asarray(gram(np.concatenate(chunks.pop(path)))))
    return grams
