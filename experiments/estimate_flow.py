"""Optical flow between two frames with a converted or trained RAFT.

  python -m experiments.estimate_flow --model DIR FRAME1 FRAME2 --out flow.flo --png flow.png \\
      [--iters 32] [--gt GT.flo] [--corr all_pairs|on_the_fly]

DIR is a RAFT model checkpoint: ``python -m hkt_jax.convert raft --src raft-things.pth --out DIR``
(princeton-vl's released checkpoints or a torchvision ``raft_large`` / ``raft_small`` state dict),
or a RAFT child exported by training. Frames are padded to a multiple of 8 by replicating
edge pixels, centred (princeton-vl's ``InputPadder``, Sintel mode), and the flow is cropped
back. Writes Middlebury ``.flo`` and a colour-wheel PNG; with ``--gt`` prints the end-point
error. Errors exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

WEIGHTS_HINT = (
    "RAFT weights come from a PyTorch checkpoint converted once with "
    "`python -m hkt_jax.convert raft --src raft-things.pth --out DIR` (princeton-vl's released raft-*.pth or a "
    "torchvision raft_large/raft_small state dict), or from a RAFT child exported by training"
)


def pad_to_multiple_of_8(frame: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Edge-replicated, centred padding; returns the padded frame and (top, left, height, width) to crop."""
    height, width = frame.shape[:2]
    pad_h, pad_w = (-height) % 8, (-width) % 8
    top, left = pad_h // 2, pad_w // 2
    padded = np.pad(frame, ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode="edge")
    return padded, (top, left, height, width)


def load_raft(model_dir: str | None, corr_impl: str):
    if not model_dir:
        raise ValueError(f"no --model given. {WEIGHTS_HINT}")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found. {WEIGHTS_HINT}")
    from hkt_jax.training.checkpoint import load_model
    from hkt_jax.models import RAFT

    variables, spec = load_model(model_dir)
    if spec.get("arch") != "raft":
        raise ValueError(f"{model_dir} holds a {spec.get('arch')!r} model, not RAFT. {WEIGHTS_HINT}")
    # Inference only: the rolled loop compiles faster (unrolling speeds up training's backward pass).
    return RAFT(small=bool(spec["kwargs"].get("small", False)), corr_impl=corr_impl, unroll=1), variables


def estimate(model, variables, frame1: np.ndarray, frame2: np.ndarray, iters: int) -> np.ndarray:
    """The last iteration's flow ``(H, W, 2)`` for frames of any size."""
    import jax

    if frame1.shape != frame2.shape:
        raise ValueError(
            f"the frames differ in size: {frame1.shape[1]}x{frame1.shape[0]} and {frame2.shape[1]}x{frame2.shape[0]}"
        )
    (image1, region), (image2, _) = pad_to_multiple_of_8(frame1), pad_to_multiple_of_8(frame2)
    run = jax.jit(lambda v, a, b: model.apply(v, a, b, iters=iters)[-1])
    flow = np.asarray(run(variables, image1[None], image2[None]))[0]
    top, left, height, width = region
    return flow[top : top + height, left : left + width]


def run(args: argparse.Namespace) -> None:
    from hkt_jax.data.flow_io import flow_to_color, read_flo, read_image, write_flo, write_image

    model, variables = load_raft(args.model, args.corr)
    frame1, frame2 = read_image(args.frame1), read_image(args.frame2)
    gt = read_flo(args.gt) if args.gt else None
    if gt is not None and gt.shape[:2] != frame1.shape[:2]:
        raise ValueError(
            f"--gt {args.gt} is {gt.shape[1]}x{gt.shape[0]}, the frames {frame1.shape[1]}x{frame1.shape[0]}"
        )
    start = time.perf_counter()
    flow = estimate(model, variables, frame1, frame2, args.iters)
    seconds = time.perf_counter() - start
    print(
        f"RAFT(small={model.small}) {args.iters} iterations on {frame1.shape[1]}x{frame1.shape[0]} frames: "
        f"{seconds:.1f} s (including compilation); mean |flow| {np.linalg.norm(flow, axis=-1).mean():.2f} px"
    )
    if args.out:
        print(f"  flow:    {write_flo(args.out, flow)}")
    if args.png:
        print(f"  picture: {write_image(args.png, flow_to_color(flow))}")
    if gt is not None:
        valid = np.all(np.isfinite(gt), axis=-1) & np.all(np.abs(gt) < 1e9, axis=-1)
        epe = np.linalg.norm(flow - gt, axis=-1)[valid]
        print(
            f"  EPE vs {args.gt}: {epe.mean():.3f} px (1px {np.mean(epe < 1):.3f}, 3px {np.mean(epe < 3):.3f}, "
            f"5px {np.mean(epe < 5):.3f})"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.estimate_flow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="RAFT model checkpoint dir (python -m hkt_jax.convert raft ... --out DIR)")
    parser.add_argument("frame1", help="first frame (PNG, PPM, JPEG)")
    parser.add_argument("frame2", help="second frame, same size")
    parser.add_argument("--out", help="write the flow here (Middlebury .flo)")
    parser.add_argument("--png", help="write the colour-coded flow here (Middlebury colour wheel)")
    parser.add_argument("--iters", type=int, default=32, help="refinement iterations (default 32, as RAFT's eval)")
    parser.add_argument("--gt", help="ground-truth .flo: print the end-point error")
    parser.add_argument(
        "--corr",
        default="all_pairs",
        choices=("all_pairs", "on_the_fly"),
        help="correlation: the all-pairs volume, or on the fly (memory-lean for large frames)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.iters < 1:
            raise ValueError(f"--iters must be at least 1, got {args.iters}")
        run(args)
    except (ValueError, OSError) as error:  # OSError covers FileNotFoundError
        print(f"estimate_flow: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
