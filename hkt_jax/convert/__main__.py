"""``python -m hkt_jax.convert``: pretrained PyTorch parents in, trained Flax children out.

  resnet        PyTorch CIFAR ResNet checkpoint -> model checkpoint dir (for --parent_ckpt)
  raft          PyTorch RAFT / RAFT-small checkpoint (princeton-vl or torchvision) -> model checkpoint dir
  export-torch  model checkpoint dir or training workdir -> PyTorch .pt file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from hkt_jax.checkpoint import MODEL_SPEC_FILE, load_model, load_model_spec, save_model
from hkt_jax.convert.resnet import (
    load_torch_checkpoint, require_torch, resnet_config, resnet_from_torch, resnet_to_torch,
)
from hkt_jax.data import CIFAR10_CLASSES
from hkt_jax.data.pipeline import NORMALIZATIONS
from hkt_jax.models.registry import model_spec, parameter_count

# Fields training scripts store next to the weights to say how good they are (akamaster, RepDistiller).
ACCURACY_FIELDS = ("best_prec1", "best_acc")
# Where a training run's workdir keeps its exported child.
WORKDIR_CHILD = Path("export") / "child"
# The config a training run writes to its workdir; its data section says how inputs were normalised.
RUN_CONFIG_FILE = "config.json"
CIFAR_IMAGE_SIZE = (32, 32)


def convert_resnet(args: argparse.Namespace) -> None:
    checkpoint = load_torch_checkpoint(args.src)
    variables = resnet_from_torch(checkpoint, args.depth, num_classes=args.num_classes)
    config = resnet_config(variables)
    spec = model_spec("cifar_resnet", **config)
    metadata = {"converted_from": str(Path(args.src).absolute())}
    accuracy = {field: float(checkpoint[field]) for field in ACCURACY_FIELDS if field in checkpoint}
    spec["metadata"] = {**metadata, **accuracy}
    out = save_model(args.out, variables, spec)

    print(f"converted {args.src} -> CifarResNet(depth={config['depth']}, num_classes={config['num_classes']}, "
          f"shortcut={config['shortcut']!r})")
    print(f"  parameters:     {parameter_count(variables['params']):,}")
    params, batch_stats = (len(jax.tree.leaves(variables[c])) for c in ("params", "batch_stats"))
    print(f"  tensors mapped: {params + batch_stats} ({params} params, {batch_stats} batch_stats)")
    for field, value in accuracy.items():
        print(f"  source {field}: {value:g}")
    print(f"  written to:     {out}")


def resolve_model_dir(src: Path) -> Path:
    """A model checkpoint dir as given, or the exported child inside a training workdir."""
    for candidate in (src, src / WORKDIR_CHILD):
        if (candidate / MODEL_SPEC_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{src} is neither a model checkpoint dir nor a training workdir: "
        f"no {src / MODEL_SPEC_FILE} and no {src / WORKDIR_CHILD / MODEL_SPEC_FILE}"
    )


def _run_config(model_dir: Path) -> dict:
    """The training run's config.json for a model dir a run wrote (WORKDIR/export/child, WORKDIR/best), else {}."""
    model_dir = model_dir.absolute()
    workdirs = [model_dir.parents[1]] if model_dir.parts[-2:] == WORKDIR_CHILD.parts else []
    workdirs += [model_dir.parent] if model_dir.name == "best" else []
    for workdir in workdirs:
        if (workdir / RUN_CONFIG_FILE).is_file():
            return json.loads((workdir / RUN_CONFIG_FILE).read_text())
    return {}


def export_preprocessing(data: dict, num_classes: int, normalization: str | None, model_dir: Path) -> dict:
    """What the exported network expects as input: the training run's (``data``) normalisation and class names."""
    from hkt_jax.convert.torch_models import preprocessing_record  # needs torch, like every export

    normalization = normalization or data.get("normalization")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{model_dir}: cannot tell the input normalisation the model was trained with (no "
                         f"{RUN_CONFIG_FILE} of its training run next to it); pass --normalization, one of "
                         f"{sorted(NORMALIZATIONS)}")
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
    data = _run_config(model_dir).get("data", {})
    preprocessing = export_preprocessing(data, torch_kwargs["num_classes"], args.normalization, model_dir)
    description = {
        "format": EXPORT_FORMAT,
        "torch_model": {"class": "hkt_jax.convert.torch_models.CifarResNet", "arch": "cifar_resnet",
                        "kwargs": torch_kwargs},
        "preprocessing": preprocessing,
        "training_data": {key: data[key] for key in ("source", "name", "path") if key in data},
        "spec": spec,
        "exported_from": str(model_dir.absolute()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**description, "state_dict": state_dict}, out)
    out.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    print(f"exported {model_dir} ({spec['kwargs']}) -> {out}")
    print(f"  tensors: {len(state_dict)} (PyTorch akamaster layout, loads with strict=True)")
    print(f"  input:   RGB uint8 -> (x / 255 - mean) / std ({preprocessing['normalization']}), NCHW float32, "
          f"{preprocessing['image_size'][0]}x{preprocessing['image_size'][1]}, {torch_kwargs['num_classes']} classes")
    print(f"  load it: model, preprocess = hkt_jax.convert.torch_models.load_exported({str(out)!r}) "
          f"(same description in {out.with_suffix('.json')})")


def convert_raft(args: argparse.Namespace) -> None:
    from hkt_jax.convert.raft import checkpoint_layout, load_checkpoint, raft_from_torch

    checkpoint = load_checkpoint(args.src)
    variables = raft_from_torch(checkpoint)  # raises before anything is written
    layout, small = checkpoint_layout(checkpoint)
    spec = {"arch": "raft", "kwargs": {"small": small},
            "metadata": {"converted_from": str(Path(args.src).absolute()), "source_layout": layout}}
    out = save_model(args.out, variables, spec)
    print(f"converted {args.src} ({layout} layout) -> RAFT(small={small})")
    print(f"  parameters:     {parameter_count(variables['params']):,}")
    print(f"  written to:     {out}")


def export_raft_torch(model_dir: Path, out: Path) -> None:
    """A RAFT model checkpoint -> {'state_dict', 'spec', 'torchvision_builder'} (torchvision layout, strict)."""
    from hkt_jax.convert.raft import raft_to_torch

    torch = require_torch()
    variables, spec = load_model(model_dir)
    small = bool(spec.get("kwargs", {}).get("small", False))
    state_dict = raft_to_torch(variables, small=small)
    builder = "raft_small" if small else "raft_large"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "spec": spec, "torchvision_builder": builder}, out)
    print(f"exported {model_dir} (RAFT small={small}) -> {out}")
    print(f"  tensors: {len(state_dict)} (torchvision layout: torchvision.models.optical_flow.{builder}(weights=None)"
          ".load_state_dict(..., strict=True); it takes images in [-1, 1])")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hkt_jax.convert",
        description="Convert model weights between PyTorch checkpoints and hkt_jax model checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    resnet = commands.add_parser(
        "resnet", help="PyTorch CIFAR ResNet checkpoint -> hkt_jax model checkpoint dir",
        description="Convert a PyTorch CIFAR ResNet (akamaster option A, or option B with shortcut.0/1) into a "
                    "model checkpoint dir usable as --parent_ckpt. Fails listing every key that does not fit.",
    )
    resnet.add_argument("--src", required=True, help="PyTorch checkpoint file (.th/.pt): a state dict, or a dict "
                        "holding one under 'state_dict', 'model' or 'net'; 'module.' prefixes are stripped")
    resnet.add_argument("--depth", required=True, type=int, help="ResNet depth 6n+2 the checkpoint was trained with "
                        "(20, 32, 44, 56, 110, ...)")
    resnet.add_argument("--out", required=True, help="output model checkpoint directory (model.json + variables/; "
                        "overwritten)")
    resnet.add_argument("--num_classes", type=int, default=None, help="classifier outputs; default: read from the "
                        "checkpoint's classifier")
    resnet.set_defaults(run=convert_resnet)

    raft = commands.add_parser(
        "raft", help="PyTorch RAFT / RAFT-small checkpoint -> hkt_jax model checkpoint dir",
        description="Convert a princeton-vl (raft-things.pth, raft-small.pth, ...; 'module.' prefixes) or torchvision "
                    "(raft_large / raft_small state dict) checkpoint; the size is detected. Fails listing every key "
                    "that does not fit, and then writes nothing.",
    )
    raft.add_argument("--src", required=True, help="PyTorch checkpoint file (.pth/.pt): a state dict")
    raft.add_argument("--out", required=True, help="output model checkpoint directory (model.json + variables/)")
    raft.set_defaults(run=convert_raft)

    export = commands.add_parser(
        "export-torch", help="hkt_jax model checkpoint (or training workdir) -> PyTorch .pt",
        description="Write a CifarResNet model checkpoint in the akamaster PyTorch layout (state dict loadable "
                    "with strict=True) together with the input preprocessing it was trained with, and the same "
                    "description (without weights) as JSON next to it (OUT with .json). Load it with "
                    "hkt_jax.convert.torch_models.load_exported(OUT) -> (model, preprocess); needs PyTorch.",
    )
    export.add_argument("--src", required=True, help="model checkpoint dir, or a training workdir (its "
                        f"{WORKDIR_CHILD} is used)")
    export.add_argument("--out", required=True, help="output .pt file (parent dirs are created)")
    export.add_argument("--normalization", choices=sorted(NORMALIZATIONS), default=None,
                        help="input mean/std the model was trained with; default: the training run's "
                        f"data.normalization from its {RUN_CONFIG_FILE} (required for models without one)")
    export.set_defaults(run=export_torch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"python -m hkt_jax.convert {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
