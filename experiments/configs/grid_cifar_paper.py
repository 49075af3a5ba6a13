"""Table 2 on a GPU: every method x 3 seeds on the paper's `default` config (200 epochs), one shared parent.

    python -m experiments.compare --grid cifar_paper --variants child,kd,hkt,reference,hkt_no_ga \\
        --parallel K --time_budget MIN --out experiments/results/cifar_paper_gpu

The parent is the paper's ResNet-110, trained by the grid first in ROOT/parent (200 epochs on the same
data, with `default`'s low-rate warm-up: 400 steps at lr 0.01, He et al. 2016); `--parent_ckpt DIR`
swaps in another (e.g. the converted ResNet-56). Every run trains a ResNet-20 child for 200 epochs
(SGD 0.1, x0.1 at epochs 100 and 150, batch 128) and selects its best network on the 5,000-image
validation split. Variants:
- child: the child alone; kd: Hinton KD, T = 4; fitnet: CRD's one-stage FitNet hint at group 2;
  at: attention transfer at the three group ends (docs/baselines.md);
- hkt: the paper's 2HKT (after pooling, gate GA, lambda 0.6, MAE/CE/MAE, alphas 0.25/0.5/0.25);
- reference: the authors' released code's settings, built from the `reference` config;
- hkt_no_ga: the same three streams and losses with lambda = 0 (nothing inherited);
- hkt_spatial: softmax GA over spatial tokens after each residual group (the `groups` split).
"""

from hkt_jax.grids.comparison import Grid

GRID = Grid(
    experiment="experiments.cifar_hkt",
    config="default",
    seeds=(0, 1, 2),
    parent=(),
    variants={
        "child": ("method=child",),
        "kd": ("method=kd", "kd.temperature=4"),
        "fitnet": ("method=fitnet",),
        "at": ("method=at",),
        "hkt": ("method=hkt",),
        "reference": (),
        "hkt_no_ga": ("method=hkt", "hkt.lam=0"),
        "hkt_spatial": ("method=hkt", "hkt.stage_split=groups"),
    },
    variant_configs={"reference": "reference"},
    paper={"child": "91.25", "hkt": "92.4"},  # Table 2 (official CIFAR-10; the shared archive is lossy)
    description="ResNet-110 parent (trained by the grid) -> ResNet-20 child, the 200-epoch CIFAR schedule; test "
    "accuracy of the final child and of the best-on-validation child.",
)
