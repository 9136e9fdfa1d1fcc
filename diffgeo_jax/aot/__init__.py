"""Ahead-of-time compilation for TPU slices, without a TPU: every main job's jitted program
lowered on abstract inputs with its production shardings, compiled by libtpu for a named
topology (`jax.experimental.topologies`), and its per-chip memory, FLOPs and roofline bound.

    chips.py     the chips' HBM, peak and bandwidth (one table)
    shapes.py    abstract models (digits, tiny, sd15, sd21, sdxl): modules + ShapeDtypeStructs
    analysis.py  compile a lowered program, read memory_analysis / cost_analysis, the roofline
    jobs.py      the jobs: each builds the jitted function its binary runs, from the library

`launch/tpu_compile.py` is the binary. Everything here is a compiler estimate, not a measured
TPU time. Needs libtpu (`pip install 'diffgeo_jax[tpu]'`).
"""
