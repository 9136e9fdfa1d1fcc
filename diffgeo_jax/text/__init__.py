"""Text-embedding tools: DECOR's decomposition and projection (arXiv 2412.09169).

    from diffgeo_jax.text import decor
    X2 = decor.project(X, X_undesired, strength=0.5)
"""
