"""hkt_jax: Hereditary Knowledge Transfer in JAX/Flax.

A frozen parent network lends its features to a small child network during
training (ETM triad + Genetic Attention); the child then ships alone.
Nothing here reads flags or touches the file system at import time.
"""

__version__ = "0.1.0"
