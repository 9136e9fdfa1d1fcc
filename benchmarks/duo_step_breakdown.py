"""Where a DUO step spends its time on the CPU: one forward pass of the small UNet (6 samples, one
pass of a 2-pair step), forward + backward through all parameters, the DUO loss value and its
value and gradient; ours and diffusers side by side. Medians of 5 after a warm-up.

    PYTHONPATH=. python benchmarks/duo_step_breakdown.py
"""
import time, jax, jax.numpy as jnp, numpy as np
from benchmarks.common import CONFIGS, build_unets
from diffgeo_jax.diffusion import schedules
from diffgeo_jax.training import lora
from diffgeo_jax.unlearning import duo
tmodel, model, params, cfg, _ = build_unets('small')
s = CONFIGS['small']['size']; b=2
rng=np.random.default_rng(0)
batch={'positive': jnp.asarray(rng.uniform(-1,1,(b,s,s,cfg.in_channels)),jnp.float32),'negative': jnp.asarray(rng.uniform(-1,1,(b,s,s,cfg.in_channels)),jnp.float32),
       'context': jnp.asarray(rng.standard_normal((b,CONFIGS['small']['context_len'],cfg.per_block('cross_attention_dim')[0])),jnp.float32)}
sched=schedules.scaled_linear(1000)
eps_fn=lambda p,x,t,c: model.apply({'params':p},x,t,c)
lp=lora.init(jax.random.key(1), params, rank=4, targets=r'attn1/to_(q|k|v|out_0)$', alpha=4.)
f=lambda lp,k: duo.loss(eps_fn, params, lp, batch, k, sched, beta=500., prior_weight=5e6)[0]
x=jnp.zeros((3*b,s,s,cfg.in_channels)); t=jnp.zeros((3*b,),jnp.int32); c=jnp.concatenate([batch['context']]*3)
fwd=jax.jit(lambda p: eps_fn(p,x,t,c))
def g_fwd(p): return jnp.sum(eps_fn(p,x,t,c)**2)
gfull=jax.jit(jax.grad(g_fwd))
def tm(fn,*a):
  jax.block_until_ready(fn(*a)); ts=[]
  for _ in range(5):
    t0=time.perf_counter(); jax.block_until_ready(fn(*a)); ts.append(time.perf_counter()-t0)
  return np.median(ts)
print('one fwd (6 samples)', tm(fwd, params))
print('grad wrt all params through one pass', tm(gfull, params))
print('duo loss value', tm(jax.jit(f), lp, jax.random.key(0)))
print('duo value_and_grad', tm(jax.jit(jax.value_and_grad(f)), lp, jax.random.key(0)))
import torch
tmodel.train()
tx=torch.zeros(3*b,cfg.in_channels,s,s); tt=torch.zeros(3*b,dtype=torch.long); tc=torch.from_numpy(np.asarray(c))
def tf():
  with torch.no_grad(): tmodel(tx,tt,encoder_hidden_states=tc)
def tg():
  tmodel.zero_grad(); (tmodel(tx,tt,encoder_hidden_states=tc).sample**2).sum().backward()
def ttm(fn):
  fn(); ts=[]
  for _ in range(5):
    t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
  return np.median(ts)
print('torch fwd', ttm(tf)); print('torch fwd+bwd (all params)', ttm(tg))
