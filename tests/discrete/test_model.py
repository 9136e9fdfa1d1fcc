"""The absorbing-diffusion transformer: the denoiser contract, the ELBO against hand computations,
attention mixing positions, and its files."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from diffgeo_jax.discrete import model as model_lib
from diffgeo_jax.discrete import processes

V, L = 5, 6
TINY = model_lib.TransformerConfig(vocab_size=V, length=L, hidden=16, heads=2, layers=2,
                                   mlp_ratio=2, cond_dim=8, time_features=16)


def _randomised(params, key, scale=0.3):
  """The zero-initialised adaLN and head make the fresh network constant; perturb every weight."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def trained_like():
  model, params = model_lib.init(jax.random.key(0), TINY)
  return model, _randomised(params, jax.random.key(1))


def _noisy(key, n=8):
  k1, k2 = jax.random.split(key)
  x0 = jax.random.randint(k1, (n, L), 0, V)
  return jnp.where(jax.random.uniform(k2, (n, L)) < 0.5, V, x0).astype(jnp.int32)


def test_fresh_network_predicts_uniform_logits():
  model, params = model_lib.init(jax.random.key(0), TINY)
  logits = jax.jit(model.apply)({'params': params}, _noisy(jax.random.key(2)), jnp.full((8,), 0.5))
  chex.assert_shape(logits, (8, L, V))
  np.testing.assert_array_equal(logits, 0.0)  # zero head: uniform posterior at initialisation


def test_denoiser_probs_sum_to_one_and_carry_over_clean_tokens_exactly(trained_like):
  model, params = trained_like
  x_t = _noisy(jax.random.key(3))
  t = jnp.linspace(0.1, 0.9, 8)
  probs = model_lib.denoiser(model, params)(x_t, t)
  chex.assert_shape(probs, (8, L, V))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  clean = np.asarray(x_t) != V
  np.testing.assert_array_equal(np.asarray(probs)[clean],
                                np.eye(V, dtype=np.float32)[np.asarray(x_t)[clean]])
  masked = ~clean
  soft = jax.nn.softmax(model.apply({'params': params}, x_t, t), -1)
  np.testing.assert_allclose(np.asarray(probs)[masked], np.asarray(soft)[masked], rtol=1e-5,
                             atol=1e-7)
  assert np.all(np.asarray(probs)[masked].max(-1) < 1.0)  # the network's guess, not a one-hot
  # Jittable as a whole (the JYS samplers trace it).
  np.testing.assert_allclose(jax.jit(model_lib.denoiser(model, params))(x_t, t), probs,
                             rtol=1e-6, atol=1e-7)


def test_inputs_are_checked(trained_like):
  model, params = trained_like
  fn = model_lib.denoiser(model, params)
  with pytest.raises(ValueError, match=r'tokens must have shape \(B, 6\)'):
    fn(jnp.zeros((2, L + 1), jnp.int32), jnp.zeros(2))
  with pytest.raises(ValueError, match=r'token ids outside \[0, 6\)'):
    fn(jnp.full((2, L), V + 1, jnp.int32), jnp.zeros(2))
  with pytest.raises(ValueError, match=r't must have shape \(B,\)'):
    fn(jnp.zeros((2, L), jnp.int32), jnp.zeros(3))
  with pytest.raises(ValueError, match='hidden=10 must be divisible by heads=4'):
    model_lib.TransformerConfig(vocab_size=V, length=L, hidden=10, heads=4)
  with pytest.raises(ValueError, match='vocab_size must be an integer >= 2'):
    model_lib.TransformerConfig(vocab_size=1, length=L)
  with pytest.raises(ValueError, match='process.vocab_size=4 differs'):
    model_lib.loss(model, params, jnp.zeros((2, L), jnp.int32), jax.random.key(0),
                   processes.Absorbing(4))
  with pytest.raises(ValueError, match=r'x0 has token ids outside \[0, 5\)'):
    model_lib.loss(model, params, jnp.full((2, L), V, jnp.int32), jax.random.key(0),
                   processes.Absorbing(V))


def test_attention_mixes_positions_and_time_conditions(trained_like):
  model, params = trained_like
  apply = jax.jit(model.apply)
  x = _noisy(jax.random.key(4), 1)
  x = x.at[0, 0].set(V).at[0, 3].set(1)
  t = jnp.full((1,), 0.5)
  base = apply({'params': params}, x, t)
  changed = apply({'params': params}, x.at[0, 3].set(2), t)
  diff = np.abs(np.asarray(changed - base))[0].max(-1)  # per position
  assert np.all(diff[[0, 1, 2, 4, 5]] > 1e-4), diff  # every other position sees token 3
  # Position embeddings: the same token at two positions gives different outputs.
  same = jnp.full((1, L), V, jnp.int32)
  out = apply({'params': params}, same, t)[0]
  assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-4
  later = apply({'params': params}, x, jnp.full((1,), 0.9))
  assert np.abs(np.asarray(later - base)).max() > 1e-4


@pytest.mark.parametrize('t', [0.001, 0.3, 0.77, 1.0])
def test_elbo_weight_is_one_over_t_for_loglinear(t):
  for eps in (0.0, 1e-3, 0.2):  # m(t) = (1 - eps) t, so m'/m = 1/t for every eps
    proc = processes.Absorbing(V, processes.LogLinear(eps=eps))
    if eps == 0.0 and t == 1.0:
      continue  # sigma_bar(1) = inf
    np.testing.assert_allclose(model_lib.elbo_weight(proc, t), 1.0 / t, rtol=2e-5)
  # Any schedule: m'(t) / m(t) with m = 1 - exp(-sigma_bar), by autodiff.
  proc = processes.Absorbing(V, processes.Geometric(0.01, 5.0))
  m = lambda s: proc.mask_prob(s)
  np.testing.assert_allclose(model_lib.elbo_weight(proc, t), jax.grad(m)(t) / m(t), rtol=1e-4)


class _FixedLogits:
  """A stand-in network: logits[b, i, v] = a known function of (x_t, t)."""
  config = TINY

  def apply(self, variables, x_t, t):
    del variables
    v = jnp.arange(V, dtype=jnp.float32)
    i = jnp.arange(L, dtype=jnp.float32)
    return (jnp.sin(v[None, None] * (i[None, :, None] + 1) + x_t[..., None])
            + 2.0 * t[:, None, None] * v[None, None])


def test_loss_equals_hand_computed_value():
  proc = processes.Absorbing(V)
  x0 = jax.random.randint(jax.random.key(5), (16, L), 0, V)
  key = jax.random.key(6)
  value, metrics = model_lib.loss(_FixedLogits(), {}, x0, key, proc, t_min=0.01)
  # The documented draw: t from the first half of the key, the masks from the second.
  k_t, k_mask = jax.random.split(key)
  t = np.asarray(jax.random.uniform(k_t, (16,), jnp.float32, 0.01, 1.0), np.float64)
  u = np.asarray(jax.random.uniform(k_mask, (16, L)))
  x0n = np.asarray(x0)
  x_t = np.where(u < (1 - 1e-3) * t[:, None], V, x0n)
  logits = np.asarray(_FixedLogits().apply(None, jnp.asarray(x_t), jnp.asarray(t, jnp.float32)),
                      np.float64)
  total, ce, hits, count = 0.0, 0.0, 0, 0
  for b in range(16):
    for i in range(L):
      if x_t[b, i] != V:
        continue
      row = logits[b, i]
      nll = np.log(np.exp(row).sum()) - row[x0n[b, i]]
      total += nll / t[b]  # w(t) = 1/t for log-linear
      ce += nll
      hits += row.argmax() == x0n[b, i]
      count += 1
  assert 0 < count < 16 * L
  np.testing.assert_allclose(value, total / 16 / L, rtol=1e-5)
  np.testing.assert_allclose(metrics['masked_ce'], ce / count, rtol=1e-5)
  np.testing.assert_allclose(metrics['masked_accuracy'], hits / count, rtol=1e-6)
  np.testing.assert_allclose(metrics['masked_fraction'], count / (16 * L), rtol=1e-6)
  # noise() is the draw loss() uses.
  t2, x_t2 = model_lib.noise(key, x0, proc, 0.01)
  np.testing.assert_array_equal(x_t2, x_t)
  np.testing.assert_allclose(t2, t, rtol=1e-6)


def test_loss_of_the_exact_posterior_is_lower_than_of_a_wrong_one():
  """masked_elbo takes any log-posterior: the truth (x0 itself) scores 0, uniform log V."""
  proc = processes.Absorbing(V)
  x0 = jax.random.randint(jax.random.key(7), (32, L), 0, V)
  t, x_t = model_lib.noise(jax.random.key(8), x0, proc)
  perfect = jnp.log(jax.nn.one_hot(x0, V) + 1e-30)
  value, metrics = model_lib.masked_elbo(perfect, x0, x_t, t, proc)
  assert float(value) < 1e-20 and float(metrics['masked_accuracy']) == 1.0
  uniform = jnp.full((32, L, V), -np.log(V))
  value, metrics = model_lib.masked_elbo(uniform, x0, x_t, t, proc)
  np.testing.assert_allclose(metrics['masked_ce'], np.log(V), rtol=1e-6)
  masked = np.asarray(x_t) == V
  np.testing.assert_allclose(value, np.mean(masked.sum(-1) / np.asarray(t)) * np.log(V) / L,
                             rtol=1e-5)


def test_loss_is_differentiable_and_finite(trained_like):
  model, params = trained_like
  x0 = jax.random.randint(jax.random.key(9), (4, L), 0, V)
  grads = jax.jit(jax.grad(lambda p: model_lib.loss(model, p, x0, jax.random.key(1),
                                                    processes.Absorbing(V))[0]))(params)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0


def test_save_load_round_trip_is_exact(tmp_path, trained_like):
  model, params = trained_like
  model_lib.save(str(tmp_path), params, TINY, {'heldout': {'elbo': 1.5}})
  loaded_model, loaded, config = model_lib.load(str(tmp_path))
  assert config == TINY and loaded_model.config == TINY
  chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(params))
  assert model_lib.read_results(str(tmp_path)) == {'heldout': {'elbo': 1.5}}
  with open(tmp_path / 'config.json') as f:
    assert json.load(f) == TINY.to_dict()
  x_t = _noisy(jax.random.key(10))
  t = jnp.full((8,), 0.4)
  np.testing.assert_array_equal(model_lib.denoiser(loaded_model, loaded)(x_t, t),
                                model_lib.denoiser(model, params)(x_t, t))


def test_load_lists_missing_unexpected_and_misshaped_keys(tmp_path, trained_like):
  _, params = trained_like
  model_lib.save(str(tmp_path), params, TINY)
  path = str(tmp_path / 'model.safetensors')
  state = safetensors.numpy.load_file(path)
  assert 'block0/qkv/kernel' in state and 'pos_embed' in state
  del state['block1/mlp_in/bias']
  state['block9/extra'] = np.zeros(3, np.float32)
  state['head/kernel'] = np.zeros((3, 3), np.float32)
  safetensors.numpy.save_file(state, path)
  with pytest.raises(ValueError) as e:
    model_lib.load(str(tmp_path))
  msg = str(e.value)
  assert "missing keys ['block1/mlp_in/bias']" in msg and "unexpected keys ['block9/extra']" in msg
  assert 'head/kernel: stored (3, 3), expected (16, 5)' in msg
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    model_lib.load(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match=r"unknown transformer config fields \['depth'\]"):
    model_lib.TransformerConfig.from_dict({'vocab_size': 3, 'length': 2, 'depth': 3})
