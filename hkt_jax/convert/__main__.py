"""``python -m hkt_jax.convert``: pretrained PyTorch parents in, trained Flax children out.

resnet        PyTorch CIFAR ResNet checkpoint -> model checkpoint dir (for --parent_ckpt)
raft          PyTorch RAFT / RAFT-small checkpoint (princeton-vl or torchvision) -> model checkpoint dir
export-torch      model checkpoint dir or training workdir -> PyTorch .pt file (+ its torch-only model file)
export-stablehlo  training workdir -> jax.export file (raw inputs in, task output out; needs only jax)
export-onnx       training workdir -> ONNX file (ResNet, RAFT, PocketNet/U-Net; raw inputs in, task output out)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax

from hkt_jax.training.checkpoint import load_model, load_model_spec, save_model
from hkt_jax.convert.deploy import (
    CIFAR_IMAGE_SIZE,
    RUN_CONFIG_FILE,
    WORKDIR_CHILD,
    load_deployable,
    resolve_model_dir,
    run_config,
    run_normalization,
)
from hkt_jax.convert.resnet import (
    cifar_resnet_depth,
    load_torch_checkpoint,
    require_torch,
    resnet_config,
    resnet_from_torch,
    resnet_to_torch,
)
from hkt_jax.data import CIFAR10_CLASSES
from hkt_jax.data.pipeline import NORMALIZATIONS
from hkt_jax.models.registry import model_spec, parameter_count
from hkt_jax.convert.stablehlo import export_stablehlo
from hkt_jax.convert.raft import checkpoint_layout, load_checkpoint, raft_from_torch, raft_to_torch
from hkt_jax.convert.onnx_export import export_onnx

# Fields training scripts store next to the weights to say how good they are (akamaster, RepDistiller).
ACCURACY_FIELDS = ("best_prec1", "best_acc")
# export-torch writes the CIFAR ResNet's model definition beside the weights under this name.
STANDALONE_MODEL_FILE = "hkt_cifar_resnet.py"
STANDALONE_MODEL_SOURCE = Path(__file__).with_name(STANDALONE_MODEL_FILE)  # hkt_jax.convert.hkt_cifar_resnet


def convert_resnet(args: argparse.Namespace) -> None:
    checkpoint = load_torch_checkpoint(args.src)
    refuse_raft(checkpoint, args.src)
    variables = resnet_from_torch(checkpoint, args.depth, num_classes=args.num_classes)
    config = resnet_config(variables)
    spec = model_spec("cifar_resnet", **config)
    metadata = {"converted_from": str(Path(args.src).absolute())}
    accuracy = {field: float(checkpoint[field]) for field in ACCURACY_FIELDS if field in checkpoint}
    spec["metadata"] = {**metadata, **accuracy}
    out = save_model(args.out, variables, spec)

    print(
        f"converted {args.src} -> CifarResNet(depth={config['depth']}, num_classes={config['num_classes']}, "
        f"shortcut={config['shortcut']!r})"
    )
    print(f"  parameters:     {parameter_count(variables['params']):,}")
    params, batch_stats = (len(jax.tree.leaves(variables[c])) for c in ("params", "batch_stats"))
    print(f"  tensors mapped: {params + batch_stats} ({params} params, {batch_stats} batch_stats)")
    for field, value in accuracy.items():
        print(f"  source {field}: {value:g}")
    print(f"  written to:     {out}")


def refuse_raft(checkpoint, src: str) -> None:
    """A RAFT checkpoint given to ``convert resnet`` is named as one (its keys would only be listed as unexpected)."""
    try:
        layout, small = checkpoint_layout(checkpoint)
    except ValueError:  # not a RAFT checkpoint: the ResNet conversion says what it is not
        return
    raise ValueError(
        f"{src} looks like a RAFT{'-S' if small else ''} checkpoint ({layout} layout), not a CIFAR "
        f"ResNet: use `python -m hkt_jax.convert raft --src {src} --out DIR`"
    )


def refuse_resnet(checkpoint, src: str) -> None:
    """A CIFAR ResNet checkpoint given to ``convert raft`` is named as one, with the command that converts it."""
    depth = cifar_resnet_depth(checkpoint)
    if depth is not None:
        raise ValueError(
            f"{src} looks like a CIFAR ResNet checkpoint (depth {depth}, detected from its keys), not "
            f"RAFT: use `python -m hkt_jax.convert resnet --src {src} --depth {depth} --out DIR`"
        )


def export_preprocessing(data: dict, num_classes: int, normalization: str | None, model_dir: Path) -> dict:
    """What the exported network expects as input: the training run's (``data``) normalisation and class names."""
    from hkt_jax.convert.torch_models import preprocessing_record  # needs torch, like every export

    normalization = run_normalization(model_dir, normalization)
    class_names = data.get("class_names") or (CIFAR10_CLASSES if data.get("name") == "cifar10" else None)
    if class_names is None or len(class_names) != num_classes:
        class_names = [str(label) for label in range(num_classes)]
    mean, std = NORMALIZATIONS[normalization]
    return {**preprocessing_record(mean, std, CIFAR_IMAGE_SIZE, class_names), "normalization": normalization}


def export_torch(args: argparse.Namespace) -> None:
    torch = require_torch()
    from hkt_jax.convert.torch_models import EXPORT_FORMAT

    model_dir = resolve_model_dir(Path(args.src))
    if load_model_spec(model_dir).get("arch") == "raft":  # RAFT: its own layout and record
        return export_raft_torch(model_dir, Path(args.out))
    variables, spec = load_model(model_dir)
    if spec.get("arch") != "cifar_resnet":
        raise ValueError(f"{model_dir} holds a {spec.get('arch')!r} model; export-torch converts 'cifar_resnet' only")
    state_dict = resnet_to_torch(variables)
    torch_kwargs = resnet_config(variables)  # depth, num_classes, shortcut: what torch_models.CifarResNet takes
    data = run_config(model_dir).get("data", {})
    preprocessing = export_preprocessing(data, torch_kwargs["num_classes"], args.normalization, model_dir)
    description = {
        "format": EXPORT_FORMAT,
        "torch_model": {
            "class": f"{STANDALONE_MODEL_FILE}:CifarResNet",
            "arch": "cifar_resnet",
            "kwargs": torch_kwargs,
        },
        "preprocessing": preprocessing,
        "training_data": {key: data[key] for key in ("source", "name", "path") if key in data},
        "spec": spec,
        "exported_from": str(model_dir.absolute()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**description, "state_dict": state_dict}, out)
    out.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    model_file = out.parent / STANDALONE_MODEL_FILE
    shutil.copyfile(STANDALONE_MODEL_SOURCE, model_file)  # torch + numpy only: loads without jax or hkt_jax
    print(f"exported {model_dir} ({spec['kwargs']}) -> {out}")
    print(f"  tensors: {len(state_dict)} (PyTorch akamaster layout, loads with strict=True)")
    print(
        f"  input:   RGB uint8 -> (x / 255 - mean) / std ({preprocessing['normalization']}), NCHW float32, "
        f"{preprocessing['image_size'][0]}x{preprocessing['image_size'][1]}, {torch_kwargs['num_classes']} classes"
    )
    print(
        f"  load it: model, preprocess = hkt_jax.convert.torch_models.load_exported({str(out)!r}) "
        f"(same description in {out.with_suffix('.json')})"
    )
    print(
        f"  without jax or hkt_jax: {model_file} (torch + numpy only): "
        f"from {model_file.stem} import load; model, preprocess = load({str(out)!r})"
    )


def convert_raft(args: argparse.Namespace) -> None:
    checkpoint = load_checkpoint(args.src)
    refuse_resnet(checkpoint, args.src)
    variables = raft_from_torch(checkpoint)  # raises before anything is written
    layout, small = checkpoint_layout(checkpoint)
    spec = {
        "arch": "raft",
        "kwargs": {"small": small},
        "metadata": {"converted_from": str(Path(args.src).absolute()), "source_layout": layout},
    }
    out = save_model(args.out, variables, spec)
    print(f"converted {args.src} ({layout} layout) -> RAFT(small={small})")
    print(f"  parameters:     {parameter_count(variables['params']):,}")
    print(f"  written to:     {out}")


def export_raft_torch(model_dir: Path, out: Path) -> None:
    """A RAFT model checkpoint -> {'state_dict', 'spec', 'torchvision_builder'} (torchvision layout, strict)."""
    torch = require_torch()
    variables, spec = load_model(model_dir)
    small = bool(spec.get("kwargs", {}).get("small", False))
    state_dict = raft_to_torch(variables, small=small)
    builder = "raft_small" if small else "raft_large"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "spec": spec, "torchvision_builder": builder}, out)
    print(f"exported {model_dir} (RAFT small={small}) -> {out}")
    print(
        f"  tensors: {len(state_dict)} (torchvision layout: torchvision.models.optical_flow.{builder}(weights=None)"
        ".load_state_dict(..., strict=True); it takes images in [-1, 1])"
    )


def _deployable(args: argparse.Namespace):
    return load_deployable(
        args.src,
        normalization=args.normalization,
        frame_size=args.frame_size,
        iters=args.iters,
        slice_size=args.slice_size,
    )


def _print_deployment(kind: str, deployable, out: Path) -> None:
    inputs = ", ".join(
        f"{spec.name} {spec.dtype}[{', '.join('B' if n is None else str(n) for n in spec.shape)}]"
        for spec in deployable.inputs
    )
    print(f"exported {deployable.arch} ({deployable.spec.get('kwargs', {})}) -> {out} ({kind})")
    print(f"  inputs:        {inputs} (B free)")
    print(f"  output:        {deployable.output}")
    print(f"  preprocessing: {deployable.preprocessing} (inside the file)")
    print(f"  described in:  {out.with_suffix('.json')}")


def export_stablehlo_command(args: argparse.Namespace) -> None:
    deployable = _deployable(args)
    out = Path(args.out)
    export_stablehlo(deployable, out)
    _print_deployment("jax.export, CPU, float32", deployable, out)
    print("  load it:       jax.export.deserialize(bytearray(open(OUT, 'rb').read())).call(*inputs)  (jax + numpy)")


def export_onnx_command(args: argparse.Namespace) -> None:
    deployable = _deployable(args)
    out = Path(args.out)
    export_onnx(deployable, out, opset=args.opset)
    _print_deployment(f"ONNX opset {args.opset}", deployable, out)
    print("  load it:       onnxruntime.InferenceSession(OUT).run(None, {name: array, ...})")


def _size_argument(text: str) -> tuple[int, int]:
    try:
        sizes = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W or N, got {text!r}") from None
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected H,W or N, got {text!r}")
    return (sizes[0], sizes[-1])


def _add_deployment_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--src", required=True, help="training workdir (its export/child and config.json), or a model checkpoint dir"
    )
    command.add_argument(
        "--out",
        required=True,
        help="output file (parent dirs are created); a JSON description "
        "of inputs, output and preprocessing goes beside it (OUT with .json)",
    )
    command.add_argument(
        "--normalization",
        choices=sorted(NORMALIZATIONS),
        default=None,
        help="classifiers: input mean/std; default: the run's data.normalization",
    )
    command.add_argument(
        "--frame_size",
        type=_size_argument,
        default=None,
        help="RAFT: frame H,W (multiples of 8); default: the run's data.crop_size",
    )
    command.add_argument(
        "--iters", type=int, default=None, help="RAFT: refinement iterations; default: the model's (its training run's)"
    )
    command.add_argument(
        "--slice_size",
        type=_size_argument,
        default=None,
        help="segmentation: slice H,W or N; default: the run's seg.slice_size",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hkt_jax.convert",
        description="Convert model weights between PyTorch checkpoints and hkt_jax model checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    resnet = commands.add_parser(
        "resnet",
        help="PyTorch CIFAR ResNet checkpoint -> hkt_jax model checkpoint dir",
        description="Convert a PyTorch CIFAR ResNet (akamaster option A, or option B with shortcut.0/1) into a "
        "model checkpoint dir usable as --parent_ckpt. Fails listing every key that does not fit.",
    )
    resnet.add_argument(
        "--src",
        required=True,
        help="PyTorch checkpoint file (.th/.pt): a state dict, or a dict "
        "holding one under 'state_dict', 'model' or 'net'; 'module.' prefixes are stripped",
    )
    resnet.add_argument(
        "--depth",
        required=True,
        type=int,
        help="ResNet depth 6n+2 the checkpoint was trained with (20, 32, 44, 56, 110, ...)",
    )
    resnet.add_argument(
        "--out", required=True, help="output model checkpoint directory (model.json + variables/; overwritten)"
    )
    resnet.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="classifier outputs; default: read from the checkpoint's classifier",
    )
    resnet.set_defaults(run=convert_resnet)

    raft = commands.add_parser(
        "raft",
        help="PyTorch RAFT / RAFT-small checkpoint -> hkt_jax model checkpoint dir",
        description="Convert a princeton-vl (raft-things.pth, raft-small.pth, ...; 'module.' prefixes) or torchvision "
        "(raft_large / raft_small state dict) checkpoint; the size is detected. Fails listing every key "
        "that does not fit, and then writes nothing.",
    )
    raft.add_argument("--src", required=True, help="PyTorch checkpoint file (.pth/.pt): a state dict")
    raft.add_argument("--out", required=True, help="output model checkpoint directory (model.json + variables/)")
    raft.set_defaults(run=convert_raft)

    export = commands.add_parser(
        "export-torch",
        help="hkt_jax model checkpoint (or training workdir) -> PyTorch .pt",
        description="Write a CifarResNet model checkpoint in the akamaster PyTorch layout (state dict loadable "
        "with strict=True) together with the input preprocessing it was trained with, and the same "
        "description (without weights) as JSON next to it (OUT with .json). Load it with "
        "hkt_jax.convert.torch_models.load_exported(OUT) -> (model, preprocess); needs PyTorch.",
    )
    export.add_argument(
        "--src", required=True, help=f"model checkpoint dir, or a training workdir (its {WORKDIR_CHILD} is used)"
    )
    export.add_argument("--out", required=True, help="output .pt file (parent dirs are created)")
    export.add_argument(
        "--normalization",
        choices=sorted(NORMALIZATIONS),
        default=None,
        help="input mean/std the model was trained with; default: the training run's "
        f"data.normalization from its {RUN_CONFIG_FILE} (required for models without one)",
    )
    export.set_defaults(run=export_torch)

    stablehlo = commands.add_parser(
        "export-stablehlo",
        help="training workdir -> jax.export file (needs only jax + numpy to run)",
        description="Serialise the child's inference function with jax.export: raw inputs (uint8 NHWC images; "
        "RAFT's uint8 frame pair; a CT slice in Hounsfield units) with the run's preprocessing inside, "
        "the task's output (logits; last flow; class logits), float32, batch dimension symbolic, "
        "weights inside. Runs on CPU with stock jax (XLA convolutions, no custom calls).",
    )
    _add_deployment_arguments(stablehlo)
    stablehlo.set_defaults(run=export_stablehlo_command)

    onnx = commands.add_parser(
        "export-onnx",
        help="training workdir -> ONNX file (CIFAR ResNet, RAFT, PocketNet/U-Net; needs PyTorch)",
        description="Trace the child's PyTorch twin (akamaster CIFAR ResNet; torchvision RAFT; convert.torch_unet "
        "for PocketNet / U-Net) with the same raw inputs, preprocessing and output as export-stablehlo "
        "to ONNX (TorchScript exporter, dynamic batch axis). DenseUNet has no twin: use "
        "export-stablehlo.",
    )
    _add_deployment_arguments(onnx)
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s; RAFT needs >= 16)")
    onnx.set_defaults(run=export_onnx_command)
    return parser


# Commands whose --out is one file, with the suffix the docs give it; the others write a model checkpoint dir.
FILE_OUTPUTS = {"export-torch": ".pt", "export-stablehlo": ".jaxexport", "export-onnx": ".onnx"}


def check_output(out: Path, suffix: str | None) -> None:
    """An --out that cannot be written is named before any work (an export traces the whole network).

    ``suffix`` is None where --out is a model checkpoint directory, else the output file's usual suffix.
    """
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if existing != out and not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder: choose an --out outside it")
    if suffix is None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; expected a new (or an old, to overwrite) model checkpoint directory")
    if suffix is not None and out.is_dir():
        raise ValueError(f"--out {out}: is a directory; expected a file name, e.g. --out {out / 'child'}{suffix}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output(Path(args.out), FILE_OUTPUTS.get(args.command))
        args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"python -m hkt_jax.convert {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # cannot write --out (permissions, a full disk): nothing else went wrong
        print(
            f"python -m hkt_jax.convert {args.command}: error: {error.filename or args.out}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
