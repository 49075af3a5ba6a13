"""hkt_jax: Hereditary Knowledge Transfer in JAX/Flax.

A frozen parent network lends its features to a small child network during
training (ETM triad + Genetic Attention); the child then ships alone.
Nothing here reads flags or touches the file system at import time.

Layers (each imports only the ones before it; docs/design.md): ``runtime`` (the machine, paths,
caches), ``kernels`` (CPU convolutions), ``engine`` (Genetic Attention, ETM, the HKT engine, the
stage contract), ``models``, ``data``, ``tasks``, ``training`` (config, steps, the loop, hooks,
checkpoints, sharding, the launcher), ``grids`` (variants x seeds), ``convert`` (PyTorch <-> Flax,
exports).
"""

from hkt_jax.engine.ga import etm_mix, genetic_attention

__version__ = "0.1.0"
__all__ = ["etm_mix", "genetic_attention"]
