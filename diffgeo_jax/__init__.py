"""diffgeo_jax: the geometry of diffusion models in JAX/Flax."""

from diffgeo_jax import _xla_cpu

_xla_cpu.apply()  # must run before JAX initialises its CPU backend

__version__ = '0.1.0'
