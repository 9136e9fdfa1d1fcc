"""Training: the trainer (loop, checkpoints, EMA), sharding (mesh, FSDP rules), LoRA, losses,
precision, TensorBoard-readable summaries, and the generic objectives (text-to-image, DreamBooth,
what LoRA objectives share).

`defaults` (the configs' train/model blocks) imports ml_collections only, so that config files read
without optax or orbax. The rest imports `models`, `diffusion.schedules`, `distributed` and
`paths`; nothing here imports `diffusion.pipeline`, `geometry`, `unlearning` (DUO lives there),
`digits` or the binaries.
"""
