"""Diffusion core: noise schedules, pure-function samplers, guidance, pipelines."""
