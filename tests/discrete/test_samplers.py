"""Samplers: step probabilities against the exact one-step posterior by enumeration, the jitted
loops against the exact sampled distribution (Monte Carlo), k-Gillespie's token counts, honest NFE,
and the exact CDE / Theorem 3.1 chain on toys."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.discrete import processes, samplers, toy

from tests.discrete.test_toy import NAMED, PROCS, L, V, correlated  # the same toys


def frequencies(tokens, shape):
  x = np.asarray(tokens)
  return np.bincount(np.ravel_multi_index(x.T, shape), minlength=int(np.prod(shape))) / len(x)


class StepTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMED)
  def test_tweedie_is_the_exact_per_token_posterior(self, name):
    """q(x_s^i = j | x_t) from the enumerated joint q(x_t, x_s) equals the analytic step."""
    proc, d = PROCS[name], correlated()
    states = d.noisy_sequences(proc)
    for t, s in [(0.9, 0.5), (0.4, 0.05)]:
      joint = d._true_step(proc, states, t, s)  # (x_t, x_s)
      p_t = joint.sum(1)
      keep = np.flatnonzero(p_t > 1e-9)
      cond = joint[keep] / p_t[keep, None]
      want = np.stack([np.stack([cond[:, states[:, i] == j].sum(1)
                                 for j in range(proc.num_states)], 1) for i in range(L)], 1)
      xs = jnp.asarray(states[keep])
      ones = jnp.ones((len(keep),))
      probs = d.denoiser(proc)(xs, t * ones)
      got = samplers.tweedie_probs(proc, xs, t * ones, s * ones, probs)
      np.testing.assert_allclose(got, want, atol=3e-5)

  def test_euler_equals_tweedie_for_absorbing_loglinear(self):
    # m'(t) / m(t) = 1 / t: the frozen-rate step unmasks with (t - s) / t = (m_t - m_s) / m_t.
    proc, d = processes.Absorbing(V), correlated()
    xs = jnp.asarray(d.noisy_sequences(proc))
    ones = jnp.ones((xs.shape[0],))
    for t, s in [(1.0, 0.6), (0.3, 0.0), (0.8, 0.79)]:
      probs = d.denoiser(proc)(xs, t * ones)
      chex.assert_trees_all_close(samplers.euler_probs(proc, xs, t * ones, s * ones, probs),
                                  samplers.tweedie_probs(proc, xs, t * ones, s * ones, probs),
                                  atol=2e-6)

  @parameterized.named_parameters(*NAMED)
  def test_one_token_tweedie_is_exact(self, name):
    # With L = 1 there is nothing to factorise: any schedule samples the data exactly.
    proc = PROCS[name]
    d = toy.independent([[0.2, 0.5, 0.3]])
    q = d.sampled_distribution(proc, [1.0, 0.6, 0.2, 0.01], start='marginal', method='tweedie')
    np.testing.assert_allclose(q, d.probs, atol=2e-6)


class SampleTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(name='absorbing', method='euler', times=[1.0, 0.7, 0.35, 0.1]),
      dict(name='absorbing', method='tweedie', times=[1.0, 0.5, 0.0]),
      dict(name='uniform', method='euler', times=[1.0, 0.6, 0.3, 0.05]),
      dict(name='uniform_geometric', method='tweedie', times=[1.0, 0.6, 0.3, 0.0]),
  )
  def test_matches_exact_sampled_distribution(self, name, method, times):
    """40000 chains through the jitted loop: frequencies within 0.012 of the exact distribution
    (binomial std <= 0.0025 per cell)."""
    proc, d = PROCS[name], correlated()
    exact = d.sampled_distribution(proc, times, method=method)
    r = samplers.sample(jax.random.key(0), d.denoiser(proc), proc, times, shape=(40000, L),
                        method=method)
    np.testing.assert_allclose(frequencies(r.tokens, (V,) * L), exact, atol=0.012)

  def test_nfe_is_counted(self):
    d = correlated()
    den = d.denoiser(processes.Absorbing(V))
    key = jax.random.key(0)
    # log-linear to t = 0: the last step unmasks everything, no final call is needed
    r = samplers.sample(key, den, processes.Absorbing(V), [1.0, 0.5, 0.0], shape=(4, L))
    self.assertEqual(r.nfe, 2)
    self.assertTrue(np.all(np.asarray(r.tokens) < V))
    r = samplers.sample(key, den, processes.Absorbing(V), [1.0, 0.5, 1e-5], shape=(4, L))
    self.assertEqual(r.nfe, 3)  # the official code's N + 1
    geo = processes.Absorbing(V, processes.Geometric())  # sigma_bar(0) > 0: noise left at 0
    r = samplers.sample(key, d.denoiser(geo), geo, [1.0, 0.5, 0.0], shape=(4, L))
    self.assertEqual(r.nfe, 3)
    self.assertTrue(np.all(np.asarray(r.tokens) < V))
    r = samplers.sample(key, den, processes.Absorbing(V), [1.0, 0.5, 1e-5], shape=(4, L),
                        final_denoise=False)
    self.assertEqual(r.nfe, 2)

  def test_calls_are_counted_by_the_denoiser_itself(self):
    calls = []
    d, proc = correlated(), processes.Absorbing(V)
    exact = d.denoiser(proc)

    def counting(x, t):
      jax.debug.callback(lambda: calls.append(1))
      return exact(x, t)

    r = samplers.sample(jax.random.key(1), counting, proc, np.linspace(1, 0.01, 6),
                        shape=(2, L), method='tweedie')
    jax.block_until_ready(r.tokens)
    self.assertEqual(len(calls), r.nfe)
    self.assertEqual(r.nfe, 6)

  def test_infilling_keeps_given_tokens(self):
    d, proc = toy.countdown(3, 4), processes.Absorbing(3)
    x_init = jnp.array([[2, 3, 3, 3]] * 500)  # first token given: the rest is 1, 0, then any
    for method in samplers.METHODS:
      r = samplers.sample(jax.random.key(2), d.denoiser(proc), proc, [1.0, 0.6, 0.3, 0.0],
                          x_init=x_init, method=method)
      x = np.asarray(r.tokens)
      np.testing.assert_array_equal(x[:, :3], np.tile([2, 1, 0], (500, 1)), err_msg=method)
      self.assertEqual(set(x[:, 3]), {0, 1, 2})

  def test_gillespie_unmasks_the_scheduled_counts(self):
    d, proc = correlated(), processes.Absorbing(V)
    times = [1.0, 0.9, 0.3]
    counts = samplers.masked_counts(proc, times, L)
    np.testing.assert_array_equal(counts, [3, 3, 1])  # round(3 * 0.9), round(3 * 0.3)
    r = samplers.sample(jax.random.key(3), d.denoiser(proc), proc, times, shape=(200, L),
                        method='gillespie', final_denoise=False)
    np.testing.assert_array_equal(np.sum(np.asarray(r.tokens) == V, 1), np.full(200, 1))

  def test_gillespie_is_exact_for_independent_tokens(self):
    d = toy.independent([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.0, 0.5]])
    proc = processes.Absorbing(V)
    r = samplers.sample(jax.random.key(4), d.denoiser(proc), proc, [1.0, 0.5, 0.0],
                        shape=(40000, L), method='gillespie')
    np.testing.assert_allclose(frequencies(r.tokens, (V,) * L), d.probs, atol=0.012)

  def test_gillespie_one_token_per_step_is_exact(self):
    # One token per step, each from the exact conditional given the others: exact sampling.
    d, proc = correlated(), processes.Absorbing(V)
    times = [1.0, 0.7, 0.35, 0.0]
    np.testing.assert_array_equal(-np.diff(samplers.masked_counts(proc, times, L)), [1, 1, 1])
    r = samplers.sample(jax.random.key(5), d.denoiser(proc), proc, times, shape=(40000, L),
                        method='gillespie')
    np.testing.assert_allclose(frequencies(r.tokens, (V,) * L), d.probs, atol=0.012)

  def test_bad_inputs(self):
    d, proc = correlated(), processes.Absorbing(V)
    den = d.denoiser(proc)
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, 'method'):
      samplers.sample(key, den, proc, [1.0, 0.0], shape=(2, L), method='heun')
    with self.assertRaisesRegex(ValueError, 'strictly decreasing'):
      samplers.sample(key, den, proc, [0.0, 1.0], shape=(2, L))
    with self.assertRaisesRegex(ValueError, 'N steps need N \\+ 1'):
      samplers.sample(key, den, proc, [1.0], shape=(2, L))
    with self.assertRaisesRegex(ValueError, 'exactly one'):
      samplers.sample(key, den, proc, [1.0, 0.0])
    with self.assertRaisesRegex(ValueError, 'x_init'):
      samplers.sample(key, den, proc, [1.0, 0.0], x_init=jnp.full((2, L), 7))
    with self.assertRaisesRegex(ValueError, 'Absorbing'):
      samplers.sample(key, den, processes.Uniform(V), [1.0, 0.0], shape=(2, L),
                      method='gillespie')
    with self.assertRaisesRegex(ValueError, 'nfe'):
      samplers.uniform_times(0)


class CDETest(parameterized.TestCase):

  def test_copy_pair_closed_form(self):
    # x^1 = x^2 uniform on {0, 1}: one step 1 -> 0 only errs when both tokens are masked at 1,
    # where the true step's total correlation is I(X^1; X^2) = log 2.
    d = toy.ToyData(np.array([[0.5, 0.0], [0.0, 0.5]]))
    proc = processes.Absorbing(2)
    m1 = float(proc.mask_prob(1.0))
    np.testing.assert_allclose(d.cde(proc, [1.0, 0.0]), [m1 ** 2 * np.log(2)], rtol=1e-5)

  def test_independent_tokens_have_no_cde(self):
    d = toy.independent([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.0, 0.5]])
    for name in ('absorbing', 'uniform'):
      np.testing.assert_allclose(d.cde(PROCS[name], [1.0, 0.5, 0.1]), 0.0, atol=1e-9)

  @parameterized.parameters(
      dict(name='absorbing', times=[1.0, 0.0]),
      dict(name='absorbing', times=[1.0, 0.5, 0.0]),
      dict(name='absorbing', times=[1.0, 0.8, 0.3, 0.05]),
      dict(name='uniform', times=[1.0, 0.7, 0.3, 0.0]),
      dict(name='uniform', times=[1.0, 0.4, 0.1]),
  )
  def test_theorem_3_1(self, name, times):
    """KL(data || sampled) <= sum of CDE for the exact per-token sampler, started at q_{t_0}."""
    proc = PROCS[name]
    for d in (correlated(), toy.countdown(3, 4)):
      q = d.sampled_distribution(proc, times, start='marginal', method='tweedie')
      kl, cde = toy.kl(d.probs, q), d.cde(proc, times).sum()
      self.assertLessEqual(kl, cde + 1e-6)
      self.assertGreater(kl, 0.2 * cde)  # and not vacuous on these correlated toys


if __name__ == '__main__':
  pytest.main([__file__])
