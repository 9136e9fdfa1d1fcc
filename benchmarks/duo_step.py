r"""DUO train step: ours (JAX, one jit-compiled step) against diffusers + peft (PyTorch), same UNet,
same LoRA, same batch shapes.

    python benchmarks/duo_step.py --repeats=5 --pairs=2
    python benchmarks/duo_step.py --config=sd15 --rank=32 --pairs=1 --torch_device=cuda  # a GPU

One step of DUO as the official `naver-ai/DUO` code runs it, on benchmarks/common.py's `small`
UNet (random init, 32x32x4, cross-attention 32; `sd15`: the SD-1.5 UNet shape, 64x64x4 latents)
with LoRA rank `--rank` (alpha = rank, the official scripts' 32 / 32) on the self-attention
projections (attn1 q, k, v, out), B pairs: the policy pass on [x+_t, x-_t, x_T] (3B samples),
the reference pass (torch: `unet.disable_adapters()` under no_grad; ours: the base parameters,
stop_gradient), the loss, its backward through the LoRA factors and an AdamW update.
* torch: `unet.add_adapter(LoraConfig(...))`, `torch.optim.AdamW` over the LoRA parameters.
* ours: `trainer.make_train_step(duo.loss ...)` with the base parameters as the frozen
  argument, `jax.jit`.
Both start from B = 0, so the first loss is ln 2 on both sides (printed as a check). Timings are
medians over `--repeats` steps after one warm-up step (ours: the compile is reported apart).
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import CONFIGS, build_unets, environment, median_time
from diffgeo_jax.diffusion import schedules
from diffgeo_jax.training import lora, trainer
from diffgeo_jax.unlearning import duo

_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed steps per side.')
_PAIRS = flags.DEFINE_integer('pairs', 2, 'Pairs per step (the official script: 1 per GPU).')
_OUT = flags.DEFINE_string('out', '', 'Write the results here as JSON.')
_CONFIG = flags.DEFINE_enum('config', 'small', ['small', 'sd15'],
                            "benchmarks/common.py's UNet config (sd15: the SD-1.5 shape).")
_TORCH_DEVICE = flags.DEFINE_string('torch_device', 'cpu', "PyTorch's device: cpu or cuda.")
_RANK = flags.DEFINE_integer('rank', 4, 'LoRA rank (alpha = rank).')
_IMPL = flags.DEFINE_enum('attention_impl', 'softmax', ['softmax', 'jax'], 'Our attention.')
BETA, PRIOR = 500.0, 5e6
TARGETS = ['attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0']


def main(argv):
  del argv
  import torch
  from peft import LoraConfig

  b, rank = _PAIRS.value, _RANK.value
  name, dev = _CONFIG.value, torch.device(_TORCH_DEVICE.value)
  tmodel, model, params, cfg, _ = build_unets(name, attention_impl=_IMPL.value)
  tmodel.to(dev)
  spec = CONFIGS[name]
  s, ctx_len, cross = spec['size'], spec['context_len'], cfg.per_block('cross_attention_dim')[0]
  rng = np.random.default_rng(0)
  x_pos = rng.uniform(-1, 1, (b, cfg.in_channels, s, s)).astype(np.float32)
  x_neg = rng.uniform(-1, 1, (b, cfg.in_channels, s, s)).astype(np.float32)
  ctx = rng.standard_normal((b, ctx_len, cross)).astype(np.float32)
  sched = schedules.scaled_linear(1000)
  ab = torch.from_numpy(np.asarray(sched.alphas_cumprod)).to(dev)

  # -- torch: diffusers + peft ------------------------------------------------------------------
  tmodel.train()
  tmodel.add_adapter(LoraConfig(r=rank, lora_alpha=float(rank), init_lora_weights='gaussian',
                                target_modules=TARGETS))
  lora_params = [p for n, p in tmodel.named_parameters() if 'lora_' in n]
  for n, p in tmodel.named_parameters():
    p.requires_grad_('lora_' in n)
  opt = torch.optim.AdamW(lora_params, lr=3e-4 * 100 / BETA, weight_decay=1e-2)
  tpos, tneg, tctx = (torch.from_numpy(x).to(dev) for x in (x_pos, x_neg, ctx))
  gen = torch.Generator(dev).manual_seed(0)
  torch_losses = []

  def torch_step():
    eps = torch.randn(tpos.shape, generator=gen, device=dev)
    t = torch.randint(0, 750, (2 * b,), generator=gen, device=dev)
    a = ab[t].view(-1, 1, 1, 1)
    x_t = torch.cat([a[:b].sqrt() * tpos + (1 - a[:b]).sqrt() * eps,
                     a[b:].sqrt() * tneg + (1 - a[b:]).sqrt() * eps, eps])
    t_all = torch.cat([t, torch.full((b,), 999, device=dev)])
    c_all = torch.cat([tctx, tctx, tctx])
    policy = tmodel(x_t, t_all, encoder_hidden_states=c_all).sample
    with torch.no_grad():
      tmodel.disable_adapters()
      ref = tmodel(x_t, t_all, encoder_hidden_states=c_all).sample
      tmodel.enable_adapters()
    target = torch.cat([eps, eps])
    e_pol = ((policy[:2 * b] - target) ** 2).mean(dim=(1, 2, 3))
    e_ref = ((ref[:2 * b] - target) ** 2).mean(dim=(1, 2, 3))
    diff = (e_pol[:b] - e_ref[:b]) - (e_pol[b:] - e_ref[b:])
    loss = torch.nn.functional.softplus(BETA * diff).mean() + PRIOR * (
        (policy[2 * b:] - ref[2 * b:]) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
    opt.step()
    torch_losses.append(float(loss))  # (a host read: the step is synchronised on any device)

  torch_step()  # warm-up; its loss is at B = 0
  torch_first = torch_losses[0]
  torch_s, torch_times, torch_foreign = median_time(torch_step, _REPEATS.value)

  # -- ours -------------------------------------------------------------------------------------
  c = trainer.default_train_config()
  c.update(learning_rate=3e-4 * 100 / BETA, schedule='constant', warmup_steps=0,
           weight_decay=1e-2, ema_decay=0.0)
  tx = trainer.make_optimizer(c)

  def eps_fn(p, x, t, context):
    return model.apply({'params': p}, x, t, context)

  def loss_fn(lp, batch, key, base):
    return duo.loss(eps_fn, base, lp, batch, key, sched, beta=BETA, prior_weight=PRIOR)

  lp = lora.init(jax.random.key(1), params, rank=rank, targets=r'attn1/to_(q|k|v|out_0)$',
                 alpha=float(rank))
  state = trainer.TrainState(jnp.zeros((), jnp.int32), lp, tx.init(lp), lp)
  step = jax.jit(trainer.make_train_step(loss_fn, tx, 0.0, with_frozen=True))
  batch = {'positive': jnp.asarray(x_pos.transpose(0, 2, 3, 1)),
           'negative': jnp.asarray(x_neg.transpose(0, 2, 3, 1)), 'context': jnp.asarray(ctx)}
  t0 = time.perf_counter()
  state, m = step(state, batch, jax.random.key(0), params)
  jax_first = float(m['loss'])
  compile_s = time.perf_counter() - t0
  box = {'state': state, 'i': 0}

  def jax_step():
    box['i'] += 1
    box['state'], metrics = step(box['state'], batch, jax.random.key(box['i']), params)
    jax.block_until_ready(metrics['loss'])

  jax_s, jax_times, jax_foreign = median_time(jax_step, _REPEATS.value)
  out = {'config': name, 'attention_impl': _IMPL.value, 'torch_device': str(dev), 'pairs': b, 'rank': rank, 'torch_s': torch_s, 'jax_s': jax_s,
         'ratio_torch_over_jax': torch_s / jax_s, 'jax_compile_s': compile_s,
         'first_loss': {'torch': torch_first, 'jax': jax_first, 'ln2': math.log(2)},
         'torch_times': torch_times, 'jax_times': jax_times,
         'foreign_cpu': {'torch': torch_foreign, 'jax': jax_foreign}, **environment()}
  print(json.dumps({k: v for k, v in out.items() if not k.endswith('_times')}, default=str))
  print(f'| {name} UNet ({_IMPL.value}), {b} pairs, torch on {dev} | torch {torch_s:.3f} s | ours {jax_s:.3f} s | '
        f'{torch_s / jax_s:.2f}x | first loss torch {torch_first:.6f} ours {jax_first:.6f} |')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(out, f, indent=2, default=str)


if __name__ == '__main__':
  app.run(main)
