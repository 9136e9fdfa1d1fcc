"""Unlearning concepts from text-to-image models: DUO (arXiv 2407.21035), whole.

    pairs.py           (unsafe, safe) image pairs gated by a concept detector (SDEdit counterparts)
    batches.py         the pairs encoded for the UNet, the branches' conditioning, batch_fn(step)
    duo.py             the DUO loss, its hyperparameter coupling, the trainer objective, FSDP rules
    embedding_attack.py  the learned-embedding attack (evaluation and adversarial rounds)
    adversarial.py     training in rounds against the attack (beyond the paper)

`launch/train_duo.py` loads the pipeline, picks the detector (the digits classifier, or none) and
runs these; `launch/evaluate_unlearning.py` measures the result. This package uses `diffusion`,
`training` and `models` objects passed in; it does not import the digits world.
"""
