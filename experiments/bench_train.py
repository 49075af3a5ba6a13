"""Training-step benchmark: ``python -m experiments.bench_train [--quick] [--json FILE] [...]``.

On the devices present, median ms per step and img/s of

  (a) the child's plain training step (cross-entropy, SGD),
  (b) the parent's forward pass in inference mode (as HKT uses it: BatchNorm folded
      unless ``--no_fold``; the unfolded forward is timed too),
  (c) the full HKT step (three streams, three losses, SGD on child + adapters),

the overhead ratio (c) / ((a) + (b)), the bytes all-reduced per step read from
the compiled HKT step's HLO (on one device: compiled for a simulated 8-device
mesh in a subprocess), and side by side, when torch is installed, the same
three measurements written in plain PyTorch eager (CIFAR ResNets with option-A
shortcuts, the parent in eval mode under ``no_grad``, gate GA on the pooled
features, SGD). Every step sees the same batch; the programs are timed in
interleaved rounds, so load from other processes hits them alike.

PyTorch runs on the device JAX would pick if it could: ``cuda`` when ``torch.cuda.is_available()``,
else the CPU. ``--torch_compile`` adds the HKT step with its loss under ``torch.compile`` (default
mode; backward through AOTAutograd, the SGD update eager), ``--amp`` the HKT step under bfloat16
autocast in channels-last (PyTorch's usual mixed precision); both beside eager, both HKT step only
(the number the comparison is about). ``--matmul_precision`` sets float32 matmuls/convolutions alike
on both sides: ``default`` is TF32 on NVIDIA GPUs for JAX (XLA's default) and for PyTorch
(``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` set to True),
``highest`` is full float32 on both; the table and JSON say which. ``--compute_dtype bfloat16`` passes
``train.compute_dtype=bfloat16`` into the config the networks are built from (an error naming the
key where this branch's config has no such key).

JAX convolutions: ``--conv_impl auto`` (default) runs the 3x3 convolutions through the CPU kernels
of ``hkt_jax.kernels.cpu_conv`` on a one-device CPU run and through XLA otherwise; ``--conv_impl xla``
times XLA's own convolutions. ``--malloc_tuning`` first tells glibc to reuse freed memory, as
``experiments.cifar_hkt`` does (``hkt_jax.runtime.malloc_tuning``); JAX and PyTorch share the process, so both
run under it. Without it (the default) both use the default allocator.

Default: ResNet-110 -> ResNet-20, batch 128, the ``default`` config's HKT
settings (2HKT after pooling, gate GA, lambda 0.6, MAE/CE/MAE, alphas
0.25/0.5/0.25). ``--quick``: ResNet-20 -> ResNet-8, batch 32, 3 rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.runtime import cpu_info
from hkt_jax.training import factories, sharding
from hkt_jax.models import fold
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.kernels import cpu_conv
from hkt_jax.runtime.malloc_tuning import tune_malloc_for_xla
from hkt_jax.models import CifarResNet, parameter_count
from hkt_jax.tasks import Classification
from hkt_jax.training.run import compile_steps, initial_state

NUM_CLASSES = 10


# -- JAX side -----------------------------------------------------------------------------------------


def _parent_variables(parent: CifarResNet, seed: int) -> Any:
    """Random weights with non-trivial running statistics (as a trained parent has)."""
    variables = parent.init(jax.random.key(seed), jnp.zeros((2, 32, 32, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def stats(path, x):
        key = jax.tree_util.keystr(path)
        if key.endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape).astype(np.float32))
        if key.endswith("['mean']"):
            return jnp.asarray(rng.normal(0, 0.1, x.shape).astype(np.float32))
        return x

    return {
        "params": variables["params"],
        "batch_stats": jax.tree_util.tree_map_with_path(stats, variables["batch_stats"]),
    }


@dataclasses.dataclass
class JaxPrograms:
    child_step: Callable
    parent_forward: Callable
    parent_forward_unfolded: Callable
    hkt_step: Callable
    info: dict[str, Any]


def build_jax(args, mesh) -> JaxPrograms:
    dtype = [f"train.compute_dtype={args.compute_dtype}"] if args.compute_dtype else []
    config = apply_overrides(
        load_config(args.config),
        [
            f"child.depth={args.child_depth}",
            f"parent.depth={args.parent_depth}",
            f"train.batch_size={args.batch_size}",
            "train.steps=1000",
            *dtype,
            *args.override,
        ],
    )
    task = Classification()
    classes = {"num_classes": NUM_CLASSES}
    stage_split = config.hkt.stage_split
    child, _ = factories.make_model(config.child, classes, stage_split=stage_split, conv_impl=args.conv_impl)
    raw_parent, _ = factories.make_model(config.parent, classes, stage_split=stage_split, conv_impl=args.conv_impl)
    raw_parent_vars = _parent_variables(raw_parent, seed=1)
    parent, parent_vars = (
        (raw_parent, raw_parent_vars) if args.no_fold else fold.fold_parent(raw_parent, raw_parent_vars)
    )
    # --override hkt.child_taps=... hkt.parent_taps=...: the same networks cut by submodule path (Tapped).
    child, parent = factories.tap_models(child, parent, config.hkt.child_taps, config.hkt.parent_taps)
    sample = jnp.zeros((2, 32, 32, 3), jnp.float32)
    tx, schedule = factories.make_optimization(config.optim, 390, 1000)

    def make(method):
        loss_fn, init_variables = factories.make_method(
            method,
            child,
            task,
            sample,
            jax.random.key(2),
            parent=parent,
            parent_variables=parent_vars,
            hkt=config.hkt,
            kd=config.kd,
        )
        state = initial_state(init_variables, tx)
        state = sharding.put(state, sharding.state_shardings(state, mesh))
        step, _ = compile_steps(
            task=task,
            model=child,
            loss_fn=loss_fn,
            tx=tx,
            schedule=schedule,
            parent_variables=parent_vars,
            mesh=mesh,
            state=state,
        )
        return step, state, init_variables

    hkt_step, hkt_state, hkt_vars = make("hkt")
    child_step, child_state, _ = make("child")

    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    forward = jax.jit(lambda v, x: parent.apply(v, x, train=False), in_shardings=(repl, data), out_shardings=data)
    forward_raw = jax.jit(
        lambda v, x: raw_parent.apply(v, x, train=False), in_shardings=(repl, data), out_shardings=data
    )
    parent_vars = sharding.put(parent_vars, sharding.parent_shardings(parent_vars, mesh))
    raw_parent_vars = sharding.put_replicated(raw_parent_vars, mesh)

    rng = np.random.default_rng(0)
    batch = sharding.global_batch(
        {
            "image": rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32),
        },
        mesh,
    )
    states = {"hkt": hkt_state, "child": child_state}

    def run_hkt():
        states["hkt"], metrics = hkt_step(states["hkt"], parent_vars, batch)
        return metrics["loss"]

    def run_child():
        states["child"], metrics = child_step(states["child"], parent_vars, batch)
        return metrics["loss"]

    info = {
        "config": args.config,
        "compute_dtype": getattr(config.train, "compute_dtype", "float32"),
        "hkt": dataclasses.asdict(config.hkt),
        "optim": dataclasses.asdict(config.optim),
        "parent_folded": parent is not raw_parent,
        "conv_impl": cpu_conv.resolve_conv_impl(args.conv_impl),
        "trainable_bytes": sharding.tree_bytes(hkt_vars["params"]),
        "child_bytes": sharding.tree_bytes(hkt_vars["params"]["child"]),
        "adapter_bytes": sharding.tree_bytes(hkt_vars["params"]["adapters"]),
        "child_later_stage_bytes": _later_stage_bytes(child, hkt_vars["params"]["child"]),
        "bn_channels": parameter_count(hkt_vars["batch_stats"]) // 2,
        "parent_bytes": sharding.tree_bytes(raw_parent_vars),
        "hlo_hkt_step": lambda: hkt_step.lower(states["hkt"], parent_vars, batch).compile().as_text(),
        "hlo_child_step": lambda: child_step.lower(states["child"], parent_vars, batch).compile().as_text(),
        "hlo_parent_forward": lambda: forward.lower(parent_vars, batch["image"]).compile().as_text(),
    }
    return JaxPrograms(
        run_child,
        lambda: forward(parent_vars, batch["image"]),
        lambda: forward_raw(raw_parent_vars, batch["image"]),
        run_hkt,
        info,
    )


def _later_stage_bytes(child: CifarResNet, params: Any) -> int:
    """Bytes of the child's parameters used only after its first stage (the fc layer
    for the paper split): they get one gradient contribution per child stream."""
    if child.stage_split == "paper":
        return sharding.tree_bytes(params["fc"])
    return sharding.tree_bytes({k: v for k, v in params.items() if k.startswith(("layer2", "layer3", "fc"))})


# -- PyTorch side -------------------------------------------------------------------------------------


def torch_device(torch) -> str:
    """Where the PyTorch twin runs: the GPU when PyTorch sees one (as JAX would use it), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def match_tf32(torch, precision: str) -> dict[str, Any]:
    """Set float32 matmul/convolution precision alike in JAX and PyTorch; what each side now does.

    ``default``: XLA's default, TF32 on NVIDIA GPUs since Ampere, so PyTorch is told to allow TF32 too
    (its own default allows it for convolutions only). ``highest``: full float32 on both sides."""
    jax.config.update("jax_default_matmul_precision", None if precision == "default" else "highest")
    allow = precision == "default"
    settings = {
        "matmul_precision": precision,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision or "default",
        "jax_tf32": allow and jax.default_backend() == "gpu",
    }
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
        settings.update(
            torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    return settings


def build_torch(args, config_hkt: dict[str, Any]):
    """(child step, parent forward, HKT step) in plain PyTorch eager, and the HKT step under
    ``torch.compile`` / bfloat16 autocast when asked; None without torch."""
    try:
        import torch
        import torch.nn as tnn
        import torch.nn.functional as F
    except ImportError:
        return None
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    device = torch_device(torch)

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            r = x
            if self.stride != 1 or self.extra:  # option A: subsample, zero-pad channels
                r = F.pad(
                    x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2)
                )
            return F.relu(y + r)

    class ResNet(tnn.Module):
        def __init__(self, depth):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(16)
            layers, cin = [], 16
            for g, width in enumerate((16, 32, 64)):
                for b in range(n):
                    layers.append(Block(cin, width, 2 if g > 0 and b == 0 else 1))
                    cin = width
            self.layers = tnn.Sequential(*layers)
            self.fc = tnn.Linear(64, NUM_CLASSES)

        def features(self, x):
            return self.layers(F.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))

        def forward(self, x):
            return self.fc(self.features(x))

    memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    child = ResNet(args.child_depth).to(device=device, memory_format=memory_format).train()
    parent = ResNet(args.parent_depth).to(device=device, memory_format=memory_format).eval()
    for p in parent.parameters():
        p.requires_grad_(False)
    optim = config_hkt["optim"]

    def sgd(params):
        return torch.optim.SGD(
            params, lr=optim["learning_rate"], momentum=optim["momentum"], weight_decay=optim["weight_decay"]
        )

    opt_hkt, opt_child = sgd(child.parameters()), sgd(child.parameters())
    rng = np.random.default_rng(0)
    x_host = torch.from_numpy(rng.normal(size=(args.batch_size, 3, 32, 32)).astype(np.float32))
    x = x_host.to(device).contiguous(memory_format=memory_format)
    y = torch.from_numpy(rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int64)).to(device)
    lam = config_hkt["hkt"]["lam"]
    a1, a2, a3 = config_hkt["hkt"]["alphas"]

    def inherit(logits):
        if config_hkt["hkt"]["inherit_loss"] == "ce":
            return F.cross_entropy(logits, y)
        return (F.softmax(logits, -1) - F.one_hot(y, NUM_CLASSES).float()).abs().mean()

    def gate_mix(receiver, giver):  # receiver + lam * (1 - a) (giver - receiver), a = sigmoid(<.,.>/sqrt(C))
        a = torch.sigmoid((receiver * giver).sum(-1, keepdim=True) / math.sqrt(receiver.shape[-1]))
        return receiver + lam * (1 - a) * (giver - receiver)

    def child_step():
        opt_child.zero_grad(set_to_none=True)
        loss = F.cross_entropy(child(x), y)
        loss.backward()
        opt_child.step()
        return loss

    def parent_forward():
        with torch.no_grad():
            return parent(x)

    def hkt_loss(child, parent, x):
        feat_c = child.features(x)
        with torch.no_grad():
            feat_p = parent.features(x)
        z_native = child.fc(feat_c)
        z_backbone = child.fc(gate_mix(feat_c, feat_p))  # parent -> child (L1)
        z_head = parent.fc(gate_mix(feat_p, feat_c))  # child -> parent, through the frozen head (L3)
        return a1 * inherit(z_backbone) + a2 * F.cross_entropy(z_native, y) + a3 * inherit(z_head)

    def make_hkt_step(*, compiled: bool = False, amp: bool = False):
        """The HKT step on its own copies of the two networks (same weights), eager, compiled or AMP."""
        fmt = torch.channels_last if amp else memory_format
        own_child = ResNet(args.child_depth).to(device=device, memory_format=fmt).train()
        own_parent = ResNet(args.parent_depth).to(device=device, memory_format=fmt).eval()
        own_child.load_state_dict(child.state_dict())
        own_parent.load_state_dict(parent.state_dict())
        for p in own_parent.parameters():
            p.requires_grad_(False)
        opt = sgd(own_child.parameters())
        images = x.contiguous(memory_format=fmt)
        loss_fn = torch.compile(hkt_loss) if compiled else hkt_loss

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(own_child, own_parent, images)
            loss.backward()
            opt.step()
            return loss

        return step

    def hkt_step():
        opt_hkt.zero_grad(set_to_none=True)
        loss = hkt_loss(child, parent, x)
        loss.backward()
        opt_hkt.step()
        return loss

    if config_hkt["hkt"]["stage_split"] != "paper" or config_hkt["hkt"]["mode"] == "softmax":
        return None  # the PyTorch twin covers the paper's 2HKT (pooled vectors, gate GA) only
    programs = {"child_step": child_step, "parent_forward": parent_forward, "hkt_step": hkt_step}
    variant_errors = {}
    for name, wanted, options in (
        ("hkt_step_compiled", args.torch_compile, {"compiled": True}),
        ("hkt_step_amp", args.amp, {"amp": True}),
    ):
        if not wanted:
            continue
        try:  # the first call compiles (torch.compile needs Triton and a C compiler): a failure drops this row only
            step = make_hkt_step(**options)
            step()
            programs[name] = step
        except Exception as error:  # noqa: BLE001 - any backend failure; the eager rows still stand
            variant_errors[name] = f"{type(error).__name__}: {str(error)[:500]}"
            print(f"PyTorch {name} left out: {variant_errors[name]}", file=sys.stderr)
    if device == "cuda":  # CUDA calls return at once: wait for the GPU, as block_until_ready does for JAX
        programs = {name: _then_synchronize(fn, torch.cuda.synchronize) for name, fn in programs.items()}
    return {
        **programs,
        "info": {
            "torch": torch.__version__,
            "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "channels_last": bool(args.torch_channels_last),
            "compile": bool(args.torch_compile),
            "amp": "bfloat16 autocast, channels-last" if args.amp else None,
            "variant_errors": variant_errors,
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
        },
    }


def _then_synchronize(fn: Callable, synchronize: Callable) -> Callable:
    def run():
        out = fn()
        synchronize()
        return out

    return run


# -- timing -------------------------------------------------------------------------------------------


def _sync(out):
    if hasattr(out, "block_until_ready") or isinstance(out, (dict, list, tuple)):
        jax.block_until_ready(out)
    return out


def time_interleaved(programs: dict[str, Callable], rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Run each program once per round, in turn; median / min / all times in ms.
    The first call (compilation, allocator warm-up) and ``warmup`` more are not timed."""
    compile_ms = {}
    for name, fn in programs.items():
        start = time.perf_counter()
        _sync(fn())
        compile_ms[name] = 1000 * (time.perf_counter() - start)
        for _ in range(warmup):
            _sync(fn())
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(rounds):
        for name, fn in programs.items():
            start = time.perf_counter()
            _sync(fn())
            times[name].append(1000 * (time.perf_counter() - start))
    return {
        name: {
            "median_ms": statistics.median(t),
            "min_ms": min(t),
            "all_ms": [round(v, 2) for v in t],
            "first_call_ms": compile_ms[name],
        }
        for name, t in times.items()
    }


# -- all-reduce volume --------------------------------------------------------------------------------


def allreduce_report(args, programs: JaxPrograms | None) -> dict[str, Any]:
    """HLO-parsed all-reduce bytes per step of the HKT step (on this mesh if it has > 1
    device, else compiled in a subprocess for a simulated ``--allreduce_devices`` mesh)."""
    if programs is not None and jax.device_count() > 1:
        text = programs.info["hlo_hkt_step"]()
        ops = sharding.collective_ops(text)
        return {
            "devices": jax.device_count(),
            "simulated": False,
            "allreduce_bytes": sharding.allreduce_bytes(text),
            "num_allreduce_ops": sum(1 for k, _ in ops if k == "all-reduce"),
            "other_collectives": sorted({k for k, _ in ops if k != "all-reduce"}),
        }
    if args.allreduce_devices <= 1:
        return {"devices": 1, "simulated": False, "allreduce_bytes": 0, "note": "one device: nothing to reduce"}
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench_train",
        "--allreduce_probe",
        f"--parent_depth={args.parent_depth}",
        f"--child_depth={args.child_depth}",
        f"--batch_size={args.batch_size}",
        f"--config={args.config}",
    ]
    cmd += [f"--override={o}" for o in args.override] + (["--no_fold"] if args.no_fold else [])
    cmd += [f"--compute_dtype={args.compute_dtype}"] if args.compute_dtype else []
    env = sharding.simulated_cpu_env(args.allreduce_devices)
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parents[1]
    )
    if proc.returncode != 0:
        return {"devices": args.allreduce_devices, "simulated": True, "error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["simulated"] = True
    return result


def _probe(args) -> None:
    """Subprocess body of ``allreduce_report``: compile only, print one JSON line."""
    mesh = sharding.make_mesh()
    programs = build_jax(args, mesh)
    text = programs.info["hlo_hkt_step"]()
    ops = sharding.collective_ops(text)
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "allreduce_bytes": sharding.allreduce_bytes(text),
                "num_allreduce_ops": sum(1 for k, _ in ops if k == "all-reduce"),
                "other_collectives": sorted({k for k, _ in ops if k != "all-reduce"}),
            }
        )
    )


CONVOLUTION_CALL_TARGETS = re.compile(r'custom_call_target="(?:__cudnn\$conv\w*|hkt_conv3x3_\w+)"')
"""Custom calls that are convolutions: cuDNN's on GPUs (``__cudnn$convForward``, ``...BackwardInput``,
``...BackwardFilter``, ``__cudnn$convBiasActivationForward``) and this project's CPU kernels."""


def count_convolutions(hlo_text: str) -> int:
    """Convolutions in a compiled module: XLA ``convolution`` instructions (inside library fusions
    too) and custom calls that convolve (cuDNN on GPUs, hkt_jax.kernels.cpu_conv on CPU)."""
    xla = len(re.findall(r"\s(?:convolution)\(", hlo_text))
    return xla + len(CONVOLUTION_CALL_TARGETS.findall(hlo_text))


def recompute_check(programs: JaxPrograms) -> dict[str, int]:
    """The HKT step should hold exactly the parent's forward convolutions plus the
    child step's: the parent runs once and its stage outputs are shared by the streams."""
    counts = {
        name: count_convolutions(programs.info[f"hlo_{name}"]())
        for name in ("hkt_step", "child_step", "parent_forward")
    }
    counts["parent_runs_once"] = counts["hkt_step"] == counts["child_step"] + counts["parent_forward"]
    return counts


# -- report -------------------------------------------------------------------------------------------


def _fmt(ms: float | None, batch: int) -> tuple[str, str]:
    if ms is None:
        return f"{'-':>9s}", f"{'-':>8s}"
    return f"{ms:9.1f}", f"{1000 * batch / ms:8.0f}"


def _precision_line(precision: dict[str, Any]) -> str:
    line = (
        f"float32 matmul precision {precision['matmul_precision']}: JAX jax_default_matmul_precision="
        f"{precision['jax_default_matmul_precision']} (TF32: {'yes' if precision['jax_tf32'] else 'no'})"
    )
    if "torch_matmul_allow_tf32" in precision:
        line += (
            f", PyTorch matmul.allow_tf32={precision['torch_matmul_allow_tf32']} "
            f"cudnn.allow_tf32={precision['torch_cudnn_allow_tf32']}"
        )
    return line


def render(result: dict[str, Any]) -> str:
    b = result["batch_size"]
    jx, th = result["jax"], result.get("torch") or {}
    th_info = result.get("torch_info") or {}
    lines = [
        f"HKT training step: ResNet-{result['parent_depth']} -> ResNet-{result['child_depth']}, global batch {b}, "
        f"{result['devices']}, {result.get('cpu', 'CPU not recorded')}; median of {result['rounds']} interleaved rounds; "
        f"JAX convolutions: {result['jax_info']['conv_impl']}; malloc tuned: {result['malloc_tuned']}",
        f"compute dtype {result['jax_info']['compute_dtype']}; "
        + _precision_line(result["precision"])
        + (f"; PyTorch on {th_info['device']} ({th_info['device_name']})" if th_info else ""),
        f"{'':36s}{'JAX ms':>9s} {'img/s':>8s}   {'PyTorch ms':>10s} {'img/s':>8s}   {'JAX/PyTorch':>11s}",
    ]
    rows = [
        ("(a) child train step", "child_step", "child_step"),
        ("(b) parent forward (inference)", "parent_forward", "parent_forward"),
        ("(c) HKT step", "hkt_step", "hkt_step"),
        ("    vs PyTorch torch.compile", "hkt_step", "hkt_step_compiled"),
        ("    vs PyTorch AMP (bf16, ch-last)", "hkt_step", "hkt_step_amp"),
    ]
    for label, key, torch_key in rows:
        if key != torch_key and torch_key not in th:
            continue
        j = jx[key]["median_ms"]
        t = th.get(torch_key, {}).get("median_ms") if th else None
        ratio = f"{j / t:11.2f}" if t else f"{'-':>11s}"
        lines.append(f"{label:36s}{_fmt(j, b)[0]} {_fmt(j, b)[1]}   {_fmt(t, b)[0]:>10s} {_fmt(t, b)[1]:>8s}   {ratio}")
    if "parent_forward_unfolded" in jx:
        j = jx["parent_forward_unfolded"]["median_ms"]
        lines.append(f"{'    parent forward, BatchNorm unfolded':36s}{_fmt(j, b)[0]} {_fmt(j, b)[1]}")
    lines.append(
        f"{'(a)+(b)':36s}{result['jax_a_plus_b_ms']:9.1f}"
        + (f"{'':12s}{result['torch_a_plus_b_ms']:9.1f}" if th else "")
    )
    lines.append(
        f"{'overhead (c)/((a)+(b))':36s}{result['jax_overhead_ratio']:9.3f}"
        + (f"{'':12s}{result['torch_overhead_ratio']:9.3f}" if th else "")
        + "   target <= 1.15"
    )
    if th:
        lines.append(f"{'HKT step JAX / PyTorch':36s}{result['hkt_jax_over_torch']:9.3f}   target <= 1.00")
    conv = result["convolutions"]
    lines.append(
        f"convolutions in the compiled HKT step: {conv['hkt_step']} = child step {conv['child_step']} + "
        f"parent forward {conv['parent_forward']}: "
        + ("the parent runs once" if conv["parent_runs_once"] else "MISMATCH (something is recomputed)")
    )
    ar = result["allreduce"]
    if "error" in ar:
        lines.append(f"all-reduce: probe failed: {ar['error'][-300:]}")
    else:
        where = f"{ar['devices']}-device mesh" + (" (simulated, compiled only)" if ar.get("simulated") else "")
        info = result["jax_info"]
        expected = info["trainable_bytes"] + info["child_later_stage_bytes"] + 12 * info["bn_channels"]
        lines.append(
            f"bytes all-reduced per step, {where}: {ar['allreduce_bytes']:,} in {ar.get('num_allreduce_ops', 0)} ops"
        )
        if ar["allreduce_bytes"]:
            lines.append(
                f"  = trainable {info['trainable_bytes']:,} (child {info['child_bytes']:,} + adapters "
                f"{info['adapter_bytes']:,}) + later-stage grads reduced per stream "
                f"{info['child_later_stage_bytes']:,} + BN statistics {12 * info['bn_channels']:,} "
                f"+ scalars {ar['allreduce_bytes'] - expected:,}; frozen parent ({info['parent_bytes']:,} B): 0"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--parent_depth", type=int, default=110)
    parser.add_argument("--child_depth", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (each program once per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 -> ResNet-8, batch 32, 3 rounds")
    parser.add_argument("--config", default="default", help="experiments/configs name for the HKT/optimizer settings")
    parser.add_argument("--override", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument(
        "--conv_impl",
        default="auto",
        choices=cpu_conv.CONV_IMPLS,
        help="JAX convolutions: auto (CPU kernels on one CPU device), xla, cpu_kernel",
    )
    parser.add_argument(
        "--malloc_tuning",
        action="store_true",
        help="tune glibc malloc as experiments.cifar_hkt does (for JAX and PyTorch alike)",
    )
    parser.add_argument("--no_fold", action="store_true", help="run the parent with its BatchNorm (not folded)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch twin")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--torch_channels_last", action="store_true", help="PyTorch in channels-last memory format")
    parser.add_argument(
        "--torch_compile", action="store_true", help="also time the PyTorch HKT step under torch.compile (default mode)"
    )
    parser.add_argument(
        "--amp", action="store_true", help="also time the PyTorch HKT step under bfloat16 autocast, channels-last"
    )
    parser.add_argument(
        "--matmul_precision",
        default="default",
        choices=("default", "highest"),
        help="float32 matmuls/convolutions on both sides: default (TF32 on NVIDIA GPUs) or highest",
    )
    parser.add_argument(
        "--compute_dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="the networks' compute dtype (config train.compute_dtype; default: the config's)",
    )
    parser.add_argument(
        "--allreduce_devices",
        type=int,
        default=8,
        help="on one device, simulate this many to read the all-reduce volume (<= 1: skip)",
    )
    parser.add_argument("--json", default=None, help="write the full result here")
    parser.add_argument("--allreduce_probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.parent_depth, args.child_depth, args.batch_size = 20, 8, 32
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    malloc_tuned = tune_malloc_for_xla() if args.malloc_tuning else False
    if args.allreduce_probe:
        _probe(args)
        return 0
    load_before = os.getloadavg()
    try:
        import torch
    except ImportError:
        torch = None
    precision = match_tf32(None if args.no_torch else torch, args.matmul_precision)
    mesh = sharding.make_mesh()
    sharding.check_global_batch(args.batch_size, mesh)
    try:
        jax_programs = build_jax(args, mesh)
    except ValueError as error:
        if args.compute_dtype and "train.compute_dtype" in str(error):
            print(
                f"--compute_dtype {args.compute_dtype}: not available: this branch's config has no "
                f"train.compute_dtype key",
                file=sys.stderr,
            )
            return 2
        raise
    programs = {
        "jax/child_step": jax_programs.child_step,
        "jax/parent_forward": jax_programs.parent_forward,
        "jax/hkt_step": jax_programs.hkt_step,
    }
    if jax_programs.info["parent_folded"]:
        programs["jax/parent_forward_unfolded"] = jax_programs.parent_forward_unfolded
    twin = (
        None
        if args.no_torch
        else build_torch(args, {"hkt": jax_programs.info["hkt"], "optim": jax_programs.info["optim"]})
    )
    if twin is not None:
        programs.update({f"torch/{k}": v for k, v in twin.items() if k != "info"})
    timings = time_interleaved(programs, args.steps, args.warmup)
    info = {k: v for k, v in jax_programs.info.items() if not callable(v)}
    jx = {k.split("/", 1)[1]: v for k, v in timings.items() if k.startswith("jax/")}
    th = {k.split("/", 1)[1]: v for k, v in timings.items() if k.startswith("torch/")}
    result: dict[str, Any] = {
        "parent_depth": args.parent_depth,
        "child_depth": args.child_depth,
        "batch_size": args.batch_size,
        "rounds": args.steps,
        "warmup": args.warmup,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({os.cpu_count()} CPU cores)",
        "cpu": cpu_info.describe_cpu(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "platform": platform.platform(),
        "malloc_tuned": malloc_tuned,
        "jax": jx,
        "torch": th or None,
        "torch_info": twin["info"] if twin else None,
        "jax_info": info,
        "precision": precision,
    }
    result["jax_a_plus_b_ms"] = jx["child_step"]["median_ms"] + jx["parent_forward"]["median_ms"]
    result["jax_overhead_ratio"] = jx["hkt_step"]["median_ms"] / result["jax_a_plus_b_ms"]
    for name, t in jx.items():
        t["img_per_s"] = 1000 * args.batch_size / t["median_ms"]
    if th:
        for name, t in th.items():
            t["img_per_s"] = 1000 * args.batch_size / t["median_ms"]
        result["torch_a_plus_b_ms"] = th["child_step"]["median_ms"] + th["parent_forward"]["median_ms"]
        result["torch_overhead_ratio"] = th["hkt_step"]["median_ms"] / result["torch_a_plus_b_ms"]
        result["hkt_jax_over_torch"] = jx["hkt_step"]["median_ms"] / th["hkt_step"]["median_ms"]
        for variant in ("compiled", "amp"):
            if f"hkt_step_{variant}" in th:
                result[f"hkt_jax_over_torch_{variant}"] = (
                    jx["hkt_step"]["median_ms"] / th[f"hkt_step_{variant}"]["median_ms"]
                )
    result["allreduce"] = allreduce_report(args, jax_programs)
    result["convolutions"] = recompute_check(jax_programs)
    result["load_average_before_after"] = [list(load_before), list(os.getloadavg())]
    print(render(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
