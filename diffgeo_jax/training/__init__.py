"""Training: LoRA, losses, sharding, the trainer, and TensorBoard-readable summaries."""
