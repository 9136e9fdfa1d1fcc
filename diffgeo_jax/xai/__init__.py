"""Evaluating attribution methods (GOAR, arXiv 2407.12401): attributions, ROAR, GOAR, synthetic
data with ground-truth feature weights, and the vmapped retraining of many classifiers.

    from diffgeo_jax.xai import attributions, goar, retrain, roar, synthetic

Model-agnostic: classifiers and the manifold projection come in as functions (launch/goar.py
builds them from the digits world); only `retrain` imports `distributed`. Nothing here imports
the diffusion models, the pipeline or the digits world.
"""
