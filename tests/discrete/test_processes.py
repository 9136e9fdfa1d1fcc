"""CTMC processes against matrix exponentials of their generators, and closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from absl.testing import parameterized

from diffgeo_jax.discrete import processes

V = 4
PROCS = {
    'absorbing_loglinear': processes.Absorbing(vocab_size=V),
    'absorbing_geometric': processes.Absorbing(vocab_size=V, schedule=processes.Geometric()),
    'uniform_loglinear': processes.Uniform(vocab_size=V),
    'uniform_geometric': processes.Uniform(vocab_size=V, schedule=processes.Geometric(1e-3, 5.0)),
}
NAMED = [dict(testcase_name=k, name=k) for k in PROCS]


class ScheduleTest(parameterized.TestCase):

  def test_loglinear_mask_prob_is_linear(self):
    p = processes.Absorbing(V, processes.LogLinear(eps=1e-3))
    t = jnp.linspace(0.0, 1.0, 11)
    chex.assert_trees_all_close(p.mask_prob(t), (1 - 1e-3) * t, atol=1e-6)

  @parameterized.parameters(processes.LogLinear(), processes.LogLinear(eps=0.1),
                            processes.Geometric(), processes.Geometric(0.01, 3.0))
  def test_rate_is_derivative_of_total(self, sched):
    t = jnp.linspace(0.05, 0.95, 7)
    grad = jax.vmap(jax.grad(sched.total))(t)
    chex.assert_trees_all_close(sched.rate(t), grad, rtol=1e-4)

  def test_geometric_endpoints(self):
    s = processes.Geometric(1e-4, 20.0)
    np.testing.assert_allclose([s.total(0.0), s.total(1.0)], [1e-4, 20.0], rtol=1e-5)

  @parameterized.parameters(dict(eps=-0.1), dict(eps=1.0))
  def test_bad_eps_raises(self, eps):
    with self.assertRaisesRegex(ValueError, 'eps'):
      processes.LogLinear(eps=eps)

  @parameterized.parameters(dict(sigma_min=0.0, sigma_max=1.0), dict(sigma_min=2.0, sigma_max=1.0))
  def test_bad_geometric_raises(self, **kw):
    with self.assertRaisesRegex(ValueError, 'sigma_min'):
      processes.Geometric(**kw)


class MarginalTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMED)
  def test_generator_rows_sum_to_zero(self, name):
    q = PROCS[name].generator()
    np.testing.assert_allclose(q.sum(1), 0.0, atol=1e-12)
    self.assertTrue(np.all(q - np.diag(np.diag(q)) >= 0))

  @parameterized.named_parameters(*NAMED)
  def test_transition_equals_expm_of_generator(self, name):
    p = PROCS[name]
    for t in [0.0, 0.1, 0.5, 0.9, 1.0]:
      want = scipy.linalg.expm(float(p.schedule.total(t)) * p.generator())
      np.testing.assert_allclose(p.transition_matrix(t), want, atol=2e-6, err_msg=f't={t}')
    for s, t in [(0.2, 0.7), (0.5, 0.55)]:
      dt = float(p.schedule.total(t) - p.schedule.total(s))
      np.testing.assert_allclose(p.transition_matrix(t, s), scipy.linalg.expm(dt * p.generator()),
                                 atol=2e-6)
      # Chapman-Kolmogorov: K_{0->t} = K_{0->s} K_{s->t}
      np.testing.assert_allclose(p.transition_matrix(t),
                                 p.transition_matrix(s) @ p.transition_matrix(t, s), atol=2e-6)

  @parameterized.named_parameters(*NAMED)
  def test_per_token_marginal_rows(self, name):
    p = PROCS[name]
    x0 = jnp.array([[0, 1, 2, 3], [3, 3, 0, 1]], jnp.int32)
    t = jnp.array([0.3, 0.8])
    got = p.transition(x0, t)
    chex.assert_shape(got, (2, 4, p.num_states))
    for b in range(2):
      k = scipy.linalg.expm(float(p.schedule.total(t[b])) * p.generator())
      np.testing.assert_allclose(got[b], k[np.asarray(x0[b])], atol=2e-6)

  def test_absorbing_layout(self):
    p = processes.Absorbing(vocab_size=V)
    self.assertEqual((p.mask_id, p.num_states), (V, V + 1))
    chex.assert_trees_all_equal(p.prior_sample(None, (2, 3)), jnp.full((2, 3), V, jnp.int32))


class ForwardSamplingTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMED)
  def test_frequencies_match_marginals(self, name):
    # n = 40000 draws per position: binomial std <= 0.0025, tolerance 0.012 (~5 std).
    p = PROCS[name]
    n = 40000
    x0 = jnp.tile(jnp.array([[0, 1, 3]], jnp.int32), (n, 1))
    t = 0.6
    x_t = jax.jit(p.sample)(jax.random.key(0), x0, t)
    freq = jax.nn.one_hot(x_t, p.num_states).mean(0)
    np.testing.assert_allclose(freq, p.transition(x0[:1], t)[0], atol=0.012)

  def test_same_key_same_sample_and_per_sequence_times(self):
    p = processes.Uniform(V)
    x0 = jnp.zeros((3, 5), jnp.int32)
    t = jnp.array([0.0, 0.5, 1.0])
    a, b = p.sample(jax.random.key(3), x0, t), p.sample(jax.random.key(3), x0, t)
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(a[0], x0[0])  # t = 0, loglinear: no noise

  def test_absorbing_coupled_masks_are_nested(self):
    p = processes.Absorbing(V)
    x0 = jax.random.randint(jax.random.key(0), (64, 8), 0, V)
    u = jax.random.uniform(jax.random.key(1), x0.shape)
    hi, lo = p.add_noise(x0, 0.8, u), p.add_noise(x0, 0.3, u)
    self.assertTrue(bool(jnp.all((lo == V) <= (hi == V))))
    self.assertTrue(bool(jnp.all((hi == x0) | (hi == V))))

  def test_uniform_noise_is_uniform_given_resampled(self):
    # Given u < m, new = floor(u V / m) is uniform on [0, V): check with u on a fine grid.
    p = processes.Uniform(V)
    u = (jnp.arange(4000) + 0.5) / 4000
    x = p.add_noise(jnp.zeros((1, 4000), jnp.int32), 1.0, u[None])
    m = float(-jnp.expm1(-p.schedule.total(1.0)))
    resampled = x[0][u < m]
    np.testing.assert_allclose(jnp.bincount(resampled, length=V) / resampled.size, 1 / V,
                               atol=1e-3)


class ReverseRateTest(parameterized.TestCase):

  def test_absorbing_loglinear_rate_is_p_over_t(self):
    # R~(MASK -> j) = sigma e^{-sigma_bar} / (1 - e^{-sigma_bar}) p_j = p_j / t exactly.
    p = processes.Absorbing(V)
    x = jnp.array([[V, 1, V]], jnp.int32)
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (1, 3, V)))
    r = p.reverse_rates(x, 0.4, probs)
    chex.assert_shape(r, (1, 3, V + 1))
    np.testing.assert_allclose(r[0, 0, :V], probs[0, 0] / 0.4, rtol=1e-5)
    np.testing.assert_allclose(r[0, 2, V], -1 / 0.4, rtol=1e-5)
    np.testing.assert_allclose(r[0, 1], 0.0, atol=0)  # clean tokens never move

  @parameterized.named_parameters(*NAMED)
  def test_rows_sum_to_zero_and_ratio_route_agrees(self, name):
    p = PROCS[name]
    key1, key2 = jax.random.split(jax.random.key(0))
    x = jax.random.randint(key1, (2, 5), 0, p.num_states)
    probs = jax.nn.softmax(jax.random.normal(key2, (2, 5, V)))
    t = jnp.array([0.3, 0.7])
    r = p.reverse_rates(x, t, probs)
    np.testing.assert_allclose(r.sum(-1), 0.0, atol=1e-5)
    off = r * (1 - jax.nn.one_hot(x, p.num_states))
    self.assertTrue(bool(jnp.all(off >= 0)))
    chex.assert_trees_all_close(p.reverse_rates_from_ratios(x, t, p.ratios(x, t, probs)), r)

  def test_tau_leaping_probs(self):
    p = processes.Absorbing(V)
    x = jnp.array([[V, 0]], jnp.int32)
    probs = jnp.full((1, 2, V), 1 / V)
    r = p.reverse_rates(x, 0.5, probs)
    step = processes.tau_leaping_probs(x, r, 0.1)
    np.testing.assert_allclose(step[0, 0], [0.05] * V + [0.8], rtol=1e-5)  # (dt / t) p_j
    np.testing.assert_allclose(step[0, 1], [1, 0, 0, 0, 0], atol=0)
    big = processes.tau_leaping_probs(x, r, 5.0)  # dt R~ > 1: the diagonal is clipped to 0
    np.testing.assert_allclose(big[0, 0], [0.25] * V + [0.0], atol=1e-6)


class BadInputTest(parameterized.TestCase):

  @parameterized.parameters(1, 2.5, True, '4')
  def test_bad_vocab_size(self, v):
    with self.assertRaisesRegex(ValueError, 'vocab_size'):
      processes.Absorbing(vocab_size=v)
    with self.assertRaisesRegex(ValueError, 'vocab_size'):
      processes.Uniform(vocab_size=v)

  def test_bad_schedule(self):
    with self.assertRaisesRegex(ValueError, 'schedule'):
      processes.Uniform(V, schedule='loglinear')

  def test_bad_tokens_and_shapes(self):
    p = processes.Absorbing(V)
    with self.assertRaisesRegex(ValueError, 'x0 must hold integer'):
      p.sample(jax.random.key(0), jnp.zeros((2, 3)), 0.5)
    with self.assertRaisesRegex(ValueError, 'x0 has token ids'):
      p.add_noise(jnp.full((2, 3), V, jnp.int32), 0.5, jnp.zeros((2, 3)))  # MASK is not clean
    with self.assertRaisesRegex(ValueError, 'x_t has token ids'):
      p.reverse_rates(jnp.full((2, 3), V + 1, jnp.int32), 0.5, jnp.zeros((2, 3, V)))
    with self.assertRaisesRegex(ValueError, 'probs must have shape'):
      p.reverse_rates(jnp.zeros((2, 3), jnp.int32), 0.5, jnp.zeros((2, 3, V + 1)))
    with self.assertRaisesRegex(ValueError, 'ratios must have shape'):
      p.reverse_rates_from_ratios(jnp.zeros((2, 3), jnp.int32), 0.5, jnp.zeros((2, 3, V)))
    with self.assertRaisesRegex(ValueError, 't must be a scalar'):
      p.transition(jnp.zeros((2, 3), jnp.int32), jnp.zeros((3,)))


if __name__ == '__main__':
  pytest.main([__file__])
