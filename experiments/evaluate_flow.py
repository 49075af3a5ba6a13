"""Evaluate a RAFT model on a flow benchmark with its standard protocol; JSON out, flow PNGs for a few pairs.

  python -m experiments.evaluate_flow --model DIR --dataset chairs|sintel|kitti|folder --path P \\
      [--json OUT.json] [--png_dir DIR] [--num_png 4] [--iters N] [--max_samples N]

Protocols (princeton-vl/RAFT's evaluate.py): ``chairs`` = FlyingChairs validation
split, 24 iterations, EPE over all pixels; ``sintel`` = training clean and final
passes, 32 iterations, frames padded evenly to multiples of 8 (InputPadder),
EPE and 1/3/5-px accuracy; ``kitti`` = KITTI-2015 training, 24 iterations, KITTI
padding, EPE as the mean of per-image means and F1-all (% of valid pixels with
EPE > 3 px and > 5 % of the true flow); ``folder`` = a folder of pairs with
ground truth (e.g. ../shared/data/flow/flyingchairs), 24 iterations.
DIR is a trained child (``workdir/export/child``, ``best/``) or a converted
checkpoint (``python -m hkt_jax.convert raft``). Errors exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

# dataset -> (passes, open options, iterations, padding, per-image EPE)
PROTOCOLS = {
    "chairs": ((None,), {"split": "validation"}, 24, "sintel", False),
    "sintel": (("clean", "final"), {"split": "training"}, 32, "sintel", False),
    "kitti": ((None,), {"split": "training"}, 24, "kitti", True),
    "folder": ((None,), {}, 24, "sintel", False),
}


class _First:
    """The first ``count`` items of a random-access source."""

    def __init__(self, source, count: int | None):
        self.source, self.count = source, len(source) if count is None else min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.source[index]


def evaluate_source(
    predict: Callable[[dict], np.ndarray],
    source,
    *,
    pad_mode: str = "sintel",
    per_image_epe: bool = False,
    max_samples: int | None = None,
    png_dir: Path | None = None,
    num_png: int = 0,
    tag: str = "",
) -> dict[str, float]:
    """Metrics of ``predict(batch) -> (1, H, W, 2)`` over ``source`` (one padded pair per batch; the padding
    has ``valid`` 0, so it never counts). Writes [ground truth | prediction] PNGs of the first ``num_png``."""
    from hkt_jax.data.flow_io import flow_to_color, write_image
    from hkt_jax.data.flow_pipeline import flow_eval_batches
    from hkt_jax.tasks.flow_metrics import finalize_flow_metrics, flow_metric_sums

    totals: dict[str, list[np.ndarray]] = {}
    for index, batch in enumerate(flow_eval_batches(_First(source, max_samples), pad_mode=pad_mode)):
        flow = np.asarray(predict(batch), np.float32)
        for key, value in flow_metric_sums(flow, batch["flow"], batch["valid"]).items():
            totals.setdefault(key, []).append(np.asarray(value, np.float64))
        if png_dir is not None and index < num_png:
            top, left, height, width = (int(v) for v in batch["region"][0])
            crop = (slice(top, top + height), slice(left, left + width))
            gt, known = batch["flow"][0][crop], batch["valid"][0][crop] >= 0.5
            radius = float(np.max(np.linalg.norm(gt, axis=-1)[known], initial=0.0)) or None
            picture = np.concatenate(
                [flow_to_color(np.where(known[..., None], gt, 0.0), radius), flow_to_color(flow[0][crop], radius)],
                axis=1,
            )
            write_image(Path(png_dir) / f"{tag}{index:04d}_gt_vs_pred.png", picture)
    sums = {key: np.concatenate(values) for key, values in totals.items()}
    metrics = finalize_flow_metrics(sums, per_image_epe=per_image_epe)
    metrics["epe_all_pixels"] = finalize_flow_metrics(sums)["epe"]
    metrics["pairs"] = int(len(sums["count"]))
    return metrics


def load_predictor(model_dir: str, iters: int) -> Callable[[dict], np.ndarray]:
    """A jit-compiled ``batch -> final flow`` of the RAFT checkpoint in ``model_dir`` at ``iters`` iterations."""
    import jax

    from hkt_jax.training.checkpoint import load_model
    from hkt_jax.models import build_model

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(
            f"model directory {model_dir} not found (a trained workdir's export/child or best/, "
            "or python -m hkt_jax.convert raft --out DIR)"
        )
    variables, spec = load_model(model_dir)
    if spec.get("arch") != "raft":
        raise ValueError(f"{model_dir} holds a {spec.get('arch')!r} model, not RAFT")
    model = build_model(spec).clone(unroll=1)  # inference only: the rolled loop compiles faster
    apply = jax.jit(lambda v, a, b: model.apply(v, a, b, iters=iters)[-1])
    return lambda batch: apply(variables, batch["image1"], batch["image2"])


def evaluate(args) -> dict:
    from hkt_jax.data.flow_datasets import open_flow_dataset

    passes, options, iters, pad_mode, per_image = PROTOCOLS[args.dataset]
    iters = args.iters or iters
    predict = load_predictor(args.model, iters)
    result = {
        "model": str(args.model),
        "dataset": args.dataset,
        "path": str(args.path),
        "iters": iters,
        "pad_mode": pad_mode,
        "metrics": {},
    }
    for pass_name in passes:
        source = open_flow_dataset(
            args.dataset, args.path, **options, **({"pass_name": pass_name} if pass_name else {})
        )
        start = time.perf_counter()
        name = pass_name or args.dataset
        metrics = evaluate_source(
            predict,
            source,
            pad_mode=pad_mode,
            per_image_epe=per_image,
            max_samples=args.max_samples,
            png_dir=args.png_dir,
            num_png=args.num_png,
            tag=f"{name}_",
        )
        metrics["seconds"] = time.perf_counter() - start
        result["metrics"][name] = metrics
        print(
            f"{args.dataset} {name}: EPE {metrics['epe']:.3f}, 1px {metrics['1px']:.3f}, 3px {metrics['3px']:.3f}, "
            f"5px {metrics['5px']:.3f}, F1-all {metrics['f1']:.2f}% over {metrics['pairs']} pairs "
            f"({iters} iterations, {metrics['seconds']:.1f} s)"
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.evaluate_flow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="RAFT model dir (export/child, best/, or converted)")
    parser.add_argument("--dataset", required=True, choices=tuple(PROTOCOLS))
    parser.add_argument("--path", required=True, help="dataset root (FlyingChairs_release, Sintel, KITTI) or folder")
    parser.add_argument("--iters", type=int, default=None, help="override the protocol's iterations")
    parser.add_argument("--max_samples", type=int, default=None, help="only the first N pairs (quick checks)")
    parser.add_argument("--json", default=None, help="write the metrics here")
    parser.add_argument("--png_dir", default=None, help="write [ground truth | prediction] flow PNGs here")
    parser.add_argument("--num_png", type=int, default=4, help="pairs to draw per pass (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.iters is not None and args.iters < 1:
            raise ValueError(f"--iters must be at least 1, got {args.iters}")
        result = evaluate(args)
    except (ValueError, OSError) as error:
        print(f"evaluate_flow: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"metrics -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
