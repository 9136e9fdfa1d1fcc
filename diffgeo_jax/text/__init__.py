"""Text-embedding tools: DECOR's decomposition and projection (arXiv 2412.09169).

    from diffgeo_jax.text import decor
    X2 = decor.project(X, X_undesired, strength=0.5)

Pure array code (jax, numpy): nothing here imports the models, the pipeline or training; the
pipeline applies DECOR to prompt embeddings (`pipeline.decor_prompts`), training uses `project`.
"""
