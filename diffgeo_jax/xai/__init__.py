"""Evaluating attribution methods (GOAR, arXiv 2407.12401): attributions, ROAR, GOAR, synthetic
data with ground-truth feature weights, and the vmapped retraining of many classifiers.

    from diffgeo_jax.xai import attributions, goar, retrain, roar, synthetic
"""
