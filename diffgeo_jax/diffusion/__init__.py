"""Diffusion core: noise schedules, pure-function samplers, guidance, pipelines.

- `schedules`: NoiseSchedule (diffusers' scheduler configs); `samplers`: DDIM, DDPM, Euler,
  DPM-Solver++(2M) over eps_fn(x, t), one signature.
- `resolution`: the pooling/upsampling operators and the SNR-matched time tau(t), the leaf under
  `guidance` and `chromatography`.
- `guidance`: classifier-free and upsample guidance as functions and as guidance objects (the
  `Guidance` protocol); `chromatography`: resolution chromatography, prompt switching
  (`PromptSwitch`), cascades.
- `pipeline`: text-to-image / image-to-image over a loaded `models.Pipeline`.
- `conditioning`: the UNet's conditioning of prompts at an image size (SDXL: with its time ids),
  for code that calls the UNet itself (explore, the LoRA and DUO batches); above `pipeline`.

Nothing here imports `training`, `geometry`, `unlearning`, `digits` or the binaries; only
`pipeline` imports `models`, `text` and `distributed` (the shared mesh), and `schedules` the
config error type of `models.config_utils`.
"""
