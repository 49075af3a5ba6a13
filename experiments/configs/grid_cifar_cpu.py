"""Does HKT help at CPU scale? Six variants x three seeds of the `cifar_cpu` config.

    python -m hkt_jax.convert resnet --src ../shared/data/resnet-cifar10-torch/resnet56-4bfd9763.th \
        --depth 56 --out workdirs/parents/resnet56
    python -m experiments.compare --grid cifar_cpu --out experiments/results/compare_cifar_cpu

ResNet-56 parent (converted, frozen) -> ResNet-8 child, one epoch per run (see
experiments/configs/cifar_cpu.py). Variants:
- child: the child alone (baseline);
- kd: Hinton KD from the parent's logits, T = 4;
- hkt: the paper's 2HKT (after pooling, gate GA, lambda 0.6, MAE/CE/MAE, alphas 0.25/0.5/0.25);
- hkt_no_ga: the same three streams and losses with lambda = 0 (nothing inherited): isolates what GA adds;
- hkt_spatial: the `groups` split, softmax GA over spatial tokens after residual groups 2 and 3 (16x16 and 8x8
  tokens; beyond the paper). The boundary after group 1 (32x32 = 1,024 tokens) is switched off: with it a step
  took 6.6 s instead of ~1.5 s on the 2-core CPU;
- reference: the authors' released code's settings (the overrides that turn `default` into the `reference`
  config: CE x3, equal weights, head mixing anchored on the child, lr 0.03 on the mean of the three losses =
  the released 0.01 on their sum) at a constant rate (its 100/150-epoch milestones are never reached). The
  committed results (experiments/results/compare_cifar_cpu.*) predate that definition: their reference runs
  used lr 0.01 on the mean and the parent-anchored head mixing (each run's config.json says so).
"""

from experiments.configs import reference
from hkt_jax.grids.comparison import Grid

GRID = Grid(
    experiment="experiments.cifar_hkt",
    config="cifar_cpu",
    seeds=(0, 1, 2),
    variants={
        "child": ("method=child",),
        "kd": ("method=kd", "kd.temperature=4"),
        "hkt": ("method=hkt",),
        "hkt_no_ga": ("method=hkt", "hkt.lam=0"),
        "hkt_spatial": (
            "method=hkt",
            "hkt.stage_split=groups",
            "hkt.backbone=false,true,true",
            "hkt.head=false,true,true",
        ),
        "reference": ("method=hkt", *reference.overrides(), "optim.schedule=constant"),
    },
    description="ResNet-56 parent (converted, frozen) -> ResNet-8 child on JPEG-q75 CIFAR-10, 1 epoch, "
    "batch 128; test accuracy of the final child and of the best-on-validation child.",
)
