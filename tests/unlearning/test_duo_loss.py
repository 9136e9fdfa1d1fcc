"""DUO's loss: ln 2 at initialisation, a value recomputed independently in numpy, and its gradient
in the LoRA factors against central finite differences in float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax.diffusion import schedules
from diffgeo_jax.training import lora, losses
from diffgeo_jax.unlearning import duo

B, H, C, D = 3, 4, 2, 5  # pairs, image side, channels, context width


def eps_fn(params, x_t, t, ctx):
  """A tiny epsilon model with a dense and a conv kernel (both LoRA targets), t and context in."""
  h = jax.lax.conv_general_dilated(x_t, params['conv']['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  cond = jnp.tanh(ctx @ params['proj']['kernel'] + (t[:, None] / 1000.0))  # (N, C)
  return h + cond[:, None, None, :]


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {'conv': {'kernel': 0.3 * jax.random.normal(k1, (3, 3, C, C))},
          'proj': {'kernel': 0.3 * jax.random.normal(k2, (D, C))}}


def batch(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {'positive': jax.random.normal(k1, (B, H, H, C)),
          'negative': jax.random.normal(k2, (B, H, H, C)),
          'context': jax.random.normal(k3, (B, D))}


SCHED = schedules.linear(1000)


def with_random_b(key, lp):
  flat = lora.flatten(lp)
  keys = jax.random.split(key, len(flat))
  return lora.unflatten({p: l.replace(b=0.2 * jax.random.normal(k, l.b.shape))
                         for k, (p, l) in zip(keys, flat.items())})


def test_ln2_at_initialisation():
  params = init_params(jax.random.key(0))
  lp = lora.init(jax.random.key(1), params, rank=2, targets=r'conv|proj')
  loss, m = jax.jit(lambda lp, key: duo.loss(
      eps_fn, params, lp, batch(jax.random.key(2)), key, SCHED, beta=500.0,
      prior_weight=1e6))(lp, jax.random.key(3))
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-7)
  assert float(m['loss_prior']) == 0.0 and float(m['delta_pos']) == 0.0


def test_value_recomputed_in_numpy():
  params = init_params(jax.random.key(0))
  lp = with_random_b(jax.random.key(4), lora.init(jax.random.key(1), params, rank=2,
                                                  targets=r'conv|proj', alpha=4.0))
  data, key, beta, lam = batch(jax.random.key(2)), jax.random.key(5), 300.0, 10.0
  loss, m = duo.loss(eps_fn, params, lp, data, key, SCHED, beta=beta, prior_weight=lam,
                            t_min=1, t_max=750)
  # The documented draws: k_noise, k_t = split(key); eps (B, ...) shared; t (2B,) in [0, 750).
  k_noise, k_t = jax.random.split(key)
  eps = np.asarray(jax.random.normal(k_noise, data['positive'].shape), np.float64)
  t = np.asarray(jax.random.randint(k_t, (2 * B,), 0, 750))
  ab = np.asarray(SCHED.alphas_cumprod, np.float64)
  merged = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        lora.merge(params, lp))
  base = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def model(p, x, tt):
    return np.asarray(eps_fn(jax.tree.map(jnp.asarray, p), jnp.asarray(x, jnp.float32),
                             jnp.asarray(tt), jnp.asarray(data['context'])), np.float64)

  def err(p, x, tt):
    xt = np.sqrt(ab[tt])[:, None, None, None] * x + np.sqrt(1 - ab[tt])[:, None, None, None] * eps
    return ((model(p, xt, tt) - eps) ** 2).mean(axis=(1, 2, 3))

  x_pos, x_neg = np.asarray(data['positive']), np.asarray(data['negative'])
  d_pos = err(merged, x_pos, t[:B]) - err(base, x_pos, t[:B])
  d_neg = err(merged, x_neg, t[B:]) - err(base, x_neg, t[B:])
  want_duo = np.mean(np.log1p(np.exp(beta * (d_pos - d_neg))))
  t_last = np.full(B, 999)
  want_prior = np.mean((model(merged, eps, t_last) - model(base, eps, t_last)) ** 2)
  np.testing.assert_allclose(m['loss_duo'], want_duo, rtol=2e-4)
  np.testing.assert_allclose(m['loss_prior'], want_prior, rtol=2e-4)
  np.testing.assert_allclose(loss, want_duo + lam * want_prior, rtol=2e-4)
  assert abs(want_duo - np.log(2)) > 1e-2  # the check is not at the trivial point


def test_retain_term_recomputed_in_numpy():
  # The retain term: policy vs reference MSE on retained images noised by fold_in(key, 2)'s draws;
  # the DUO part is unchanged by its presence.
  params = init_params(jax.random.key(0))
  lp = with_random_b(jax.random.key(4), lora.init(jax.random.key(1), params, rank=2,
                                                  targets=r'conv|proj', alpha=4.0))
  data, key = batch(jax.random.key(2)), jax.random.key(5)
  r = 2
  k1, k2 = jax.random.split(jax.random.key(9))
  with_retain = {**data, 'retain': jax.random.normal(k1, (r, H, H, C)),
                 'retain_context': jax.random.normal(k2, (r, D))}
  kw = dict(beta=300.0, prior_weight=10.0)
  loss0, m0 = duo.loss(eps_fn, params, lp, data, key, SCHED, **kw)
  loss, m = duo.loss(eps_fn, params, lp, with_retain, key, SCHED, retain_weight=7.0, **kw)
  k_rn, k_rt = jax.random.split(jax.random.fold_in(key, 2))
  t = np.asarray(jax.random.randint(k_rt, (r,), 0, 1000))
  noise = np.asarray(jax.random.normal(k_rn, (r, H, H, C)), np.float64)
  ab = np.asarray(SCHED.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(ab) * np.asarray(with_retain['retain'], np.float64) + np.sqrt(1 - ab) * noise

  def model(p):
    return np.asarray(eps_fn(p, jnp.asarray(x_t, jnp.float32), jnp.asarray(t),
                             with_retain['retain_context']), np.float64)

  want = np.mean((model(lora.merge(params, lp)) - model(params)) ** 2)
  np.testing.assert_allclose(m['loss_retain'], want, rtol=2e-4)
  np.testing.assert_allclose(m['loss_duo'], m0['loss_duo'], rtol=1e-6)
  np.testing.assert_allclose(loss, loss0 + 7.0 * want, rtol=2e-4)
  assert want > 1e-4
  with pytest.raises(ValueError, match='retain_context'):
    duo.loss(eps_fn, params, lp, data, key, SCHED, retain_weight=1.0, **kw)


def test_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), init_params(jax.random.key(0)))
    lp = lora.init(jax.random.key(1), params, rank=2, targets=r'conv|proj', dtype=jnp.float64)
    lp = with_random_b(jax.random.key(4), lp)
    lp = jax.tree.map(lambda a: a.astype(jnp.float64), lp)
    data = jax.tree.map(lambda a: a.astype(jnp.float64), batch(jax.random.key(2)))
    data['retain'] = jax.random.normal(jax.random.key(10), (2, H, H, C), jnp.float64)
    data['retain_context'] = jax.random.normal(jax.random.key(11), (2, D), jnp.float64)
    key = jax.random.key(6)

    def f(lp):  # every term: DUO, prior and retain
      return duo.loss(eps_fn, params, lp, data, key, SCHED, beta=50.0,
                             prior_weight=3.0, retain_weight=2.0)[0]

    grad = jax.grad(f)(lp)
    direction = with_random_b(jax.random.key(7), jax.tree.map(jnp.zeros_like, lp))
    direction = jax.tree.map(lambda a, k: a + 0.1 * jax.random.normal(k, a.shape, a.dtype),
                             direction, jax.tree.map(lambda _: jax.random.key(8), direction))
    h = 1e-6
    plus = f(jax.tree.map(lambda a, d: a + h * d, lp, direction))
    minus = f(jax.tree.map(lambda a, d: a - h * d, lp, direction))
    fd = (plus - minus) / (2 * h)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                  jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)
    assert abs(float(fd)) > 1e-3


def test_hyperparameter_coupling_and_errors():
  lr, lam = duo.hyperparameters(3e-4, 1e6, 500.0)
  chex.assert_trees_all_close((lr, lam), (6e-5, 5e6))
  with pytest.raises(ValueError, match='beta'):
    duo.hyperparameters(3e-4, 1e6, 0.0)
  params = init_params(jax.random.key(0))
  lp = lora.init(jax.random.key(1), params, rank=2, targets=r'conv')
  bad = dict(batch(jax.random.key(2)))
  del bad['context']
  with pytest.raises(ValueError, match='context'):
    duo.loss(eps_fn, params, lp, bad, jax.random.key(0), SCHED, beta=1.0)
  with pytest.raises(ValueError, match='t_min'):
    duo.loss(eps_fn, params, lp, batch(jax.random.key(2)), jax.random.key(0), SCHED,
                    beta=1.0, t_min=0)
  with pytest.raises(ValueError, match='same shape'):
    losses.denoising_error(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
