"""Which parent block feeds which child block, from the data: linear CKA + a monotone matching.

  python -m experiments.align --parent_ckpt DIR --child_ckpt DIR [--parent NAME] [--child NAME]
      [--images 512] [--k K] [--json F] [--png F]

Runs both networks on N test images of the shared CIFAR-10 archive (a fixed
random subset, seed 0; ``--data`` for another image folder), computes linear CKA
between the outputs of every candidate submodule call (``hkt_jax.models.align``), and
chooses K pairs increasing on both networks with the largest summed CKA (``--k``;
default: K by the largest gap). Prints a table and the override line for
``hkt.parent_taps`` / ``hkt.child_taps``; ``--json`` writes the pairs and the full
matrix, ``--png`` a heat map with the chosen pairs on it. The child must have
learnt something (trained alone for a few epochs, or converted): an untrained
child has no features to match.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from hkt_jax.models import align
from hkt_jax.training.checkpoint import load_model
from hkt_jax.data.image_folder import load_image_folder, shared_cifar10_archive
from hkt_jax.data.pipeline import NORMALIZATIONS
from hkt_jax.models.registry import ARCHITECTURES, build_model

SUBSET_SEED = 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.align", description=__doc__.split("\n\n")[0])
    for side in ("parent", "child"):
        parser.add_argument(
            f"--{side}_ckpt",
            type=Path,
            required=True,
            help=f"the {side}'s model checkpoint (model.json + variables/, as `hkt_jax.convert` "
            "or a training run's export writes)",
        )
        parser.add_argument(
            f"--{side}",
            choices=sorted(ARCHITECTURES),
            help=f"the {side}'s architecture; optional: read from its model.json (if given, the two must agree)",
        )
    parser.add_argument("--images", type=int, default=512, help="how many test images (default 512)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="image folder or .tar.gz with a test split (default: the shared CIFAR-10 archive)",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--normalization",
        default="imagenet",
        choices=sorted(NORMALIZATIONS),
        help="as the networks were trained (the converted CIFAR ResNets: imagenet)",
    )
    parser.add_argument("--k", type=int, default=None, help="pairs to choose (default: by the largest gap)")
    parser.add_argument("--max_k", type=int, default=None, help="cap on K when chosen by the gap")
    parser.add_argument(
        "--max_depth",
        type=int,
        default=1,
        help="candidate paths at most this many levels deep (1: top-level submodules such as "
        "residual blocks; 0: every depth, e.g. layer1_0/bn1 too)",
    )
    parser.add_argument(
        "--include",
        default=None,
        metavar="REGEX",
        help="keep only candidate paths matching this regular expression (re.search), e.g. "
        "'^layer' for residual blocks only",
    )
    parser.add_argument(
        "--child_taps",
        default=None,
        metavar="PATH,PATH,...",
        help="fix the child's stage ends (K = their number) and choose only the parent's",
    )
    parser.add_argument(
        "--parent_taps",
        default=None,
        metavar="PATH,PATH,...",
        help="fix the parent's stage ends and choose only the child's",
    )
    parser.add_argument(
        "--max_features",
        type=int,
        default=16384,
        help="feature maps larger than this are average-pooled over windows first",
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--json", type=Path, help="write pairs and the full CKA matrix here")
    parser.add_argument("--png", type=Path, help="write the heat map with the chosen pairs here")
    args = parser.parse_args(argv)
    if args.images < 2:
        parser.error(f"--images must be at least 2 (CKA compares examples), got {args.images}")
    if args.k is not None and args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    for side in ("parent", "child"):
        fixed = getattr(args, f"{side}_taps")
        if fixed is not None:
            paths = tuple(p.strip() for p in fixed.split(",") if p.strip())
            if not paths:
                parser.error(f"--{side}_taps: expected comma-separated paths, got {fixed!r}")
            if args.k is not None and args.k != len(paths):
                parser.error(f"--k {args.k} but --{side}_taps names {len(paths)} paths")
            setattr(args, f"{side}_taps", paths)
    if args.parent_taps and args.child_taps:
        parser.error("fix the taps of one side at most (--parent_taps or --child_taps): the other is chosen")
    return args


def load_side(side: str, directory: Path, arch: str | None):
    variables, spec = load_model(directory)
    if arch is not None and spec.get("arch") != arch:
        raise SystemExit(f"error: --{side} {arch} but {directory}/model.json says {spec.get('arch')!r}")
    return build_model(spec), variables, spec


def load_images(args) -> np.ndarray:
    source = args.data or shared_cifar10_archive()
    if not Path(source).exists():
        raise SystemExit(f"error: no images at {source} (set HKT_SHARED_DATA or pass --data)")
    split = load_image_folder(source, args.split)
    if args.images > len(split):
        raise SystemExit(f"error: --images {args.images}, but the {args.split} split has {len(split)}")
    rows = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(split), args.images, replace=False))
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[args.normalization])
    return (split.images[rows].astype(np.float32) / 255 - mean) / std


def grams_of(model, variables, images, args, fixed):
    probe = images[: min(len(images), args.batch_size)]
    shapes = align.candidate_paths(
        model, variables, probe, max_depth=0 if fixed else args.max_depth, include=None if fixed else args.include
    )
    if fixed:
        unknown = [p for p in fixed if p not in shapes]
        if unknown:
            raise SystemExit(
                f"error: {unknown} cannot end a stage of {type(model).__name__}; candidates: {list(shapes)}"
            )
        order = list(shapes)
        if [order.index(p) for p in fixed] != sorted(order.index(p) for p in fixed):
            raise SystemExit(f"error: list the fixed taps in forward order: {sorted(fixed, key=order.index)}")
        shapes = {p: shapes[p] for p in fixed}
    grams = align.centred_grams(
        model, variables, images, list(shapes), batch_size=args.batch_size, max_features=args.max_features
    )
    return shapes, grams


def describe(spec) -> str:
    return f"{spec['arch']}({', '.join(f'{k}={v}' for k, v in sorted(spec.get('kwargs', {}).items()))})"


def plot(matrix, parent_paths, child_paths, pairs, title, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 3 + 0.22 * len(child_paths)), 2.5 + 0.16 * len(parent_paths)))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="linear CKA")
    rows, cols = zip(*pairs)
    ax.plot(cols, rows, "-o", color="red", markerfacecolor="none", markersize=9, linewidth=1.5, label="chosen pairs")
    ax.set_xticks(range(len(child_paths)), child_paths, rotation=90, fontsize=7)
    ax.set_yticks(range(len(parent_paths)), parent_paths, fontsize=7)
    ax.set_xlabel("child module")
    ax.set_ylabel("parent module")
    ax.set_title(title, fontsize=7)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    parent, parent_vars, parent_spec = load_side("parent", args.parent_ckpt, args.parent)
    child, child_vars, child_spec = load_side("child", args.child_ckpt, args.child)
    images = load_images(args)
    parent_shapes, parent_grams = grams_of(parent, parent_vars, images, args, args.parent_taps)
    child_shapes, child_grams = grams_of(child, child_vars, images, args, args.child_taps)
    parent_paths, child_paths = list(parent_shapes), list(child_shapes)
    matrix = align.cka_matrix([parent_grams[p] for p in parent_paths], [child_grams[c] for c in child_paths])
    totals = align.best_totals(matrix)
    if args.k is not None and args.k > len(totals):
        raise SystemExit(
            f"error: --k {args.k}, but only {len(totals)} monotone pairs fit "
            f"({len(parent_paths)} parent x {len(child_paths)} child candidates)"
        )
    fixed = args.parent_taps or args.child_taps
    if fixed:
        k, how = len(fixed), f"fixed --{'parent' if args.parent_taps else 'child'}_taps"
    elif args.k is not None:
        k, how = args.k, "given (--k)"
    else:
        k, how = align.k_by_largest_gap(totals, args.max_k), "by the largest gap"
    match = align.monotone_pairs(matrix, k)
    seconds = time.perf_counter() - started

    pairs = [
        {
            "parent": parent_paths[i],
            "child": child_paths[j],
            "cka": float(matrix[i, j]),
            "parent_shape": list(parent_shapes[parent_paths[i]]),
            "child_shape": list(child_shapes[child_paths[j]]),
        }
        for i, j in match.pairs
    ]
    print(
        f"linear CKA on {len(images)} images: {len(parent_paths)} parent x {len(child_paths)} child candidates; "
        f"K = {k} ({how}), summed CKA {match.total:.4f}, {seconds:.1f} s"
    )
    width = max(len(p["parent"]) for p in pairs) + 2
    print(f"  {'parent':<{width}}{'child':<{width}}CKA")
    for p in pairs:
        print(f"  {p['parent']:<{width}}{p['child']:<{width}}{p['cka']:.4f}")
    override = (
        f"hkt.parent_taps={','.join(p['parent'] for p in pairs)} hkt.child_taps={','.join(p['child'] for p in pairs)}"
    )
    print(f"override: {override}")
    for side in ("parent", "child"):
        nested = align.nested_paths([p[side] for p in pairs])
        if nested:
            print(
                f"warning: {side} paths {nested} run one inside the other; Tapped refuses such taps: "
                "choose another K or narrow the candidates (--max_depth 1, --include)"
            )

    if args.png:
        title = (
            f"parent {describe(parent_spec)}\nchild {describe(child_spec)}\n"
            f"linear CKA, {len(images)} images, K = {k} ({how})"
        )
        plot(matrix, parent_paths, child_paths, match.pairs, title, args.png)
        print(f"heat map: {args.png}")
    if args.json:
        record = {
            "parent": {"checkpoint": str(args.parent_ckpt), "spec": parent_spec, "paths": parent_paths},
            "child": {"checkpoint": str(args.child_ckpt), "spec": child_spec, "paths": child_paths},
            "images": len(images),
            "data": str(args.data or shared_cifar10_archive()),
            "split": args.split,
            "subset_seed": SUBSET_SEED,
            "normalization": args.normalization,
            "max_depth": args.max_depth,
            "include": args.include,
            "fixed_parent_taps": args.parent_taps,
            "fixed_child_taps": args.child_taps,
            "max_features": args.max_features,
            "k": k,
            "k_chosen": how,
            "best_totals": totals.tolist(),
            "total_cka": match.total,
            "pairs": pairs,
            "override": override,
            "matrix": matrix.tolist(),
            "seconds": round(seconds, 2),
            "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "cpu": platform.processor() or platform.machine(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
