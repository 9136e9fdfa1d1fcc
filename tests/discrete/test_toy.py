"""Toy data: exact denoiser and reverse rates against brute-force Bayes / time reversal, and the
exact sampled distribution against closed forms and Monte Carlo."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from absl.testing import parameterized

from diffgeo_jax.discrete import processes, toy

V, L = 3, 3
PROCS = {
    'absorbing': processes.Absorbing(V),
    'absorbing_geometric': processes.Absorbing(V, processes.Geometric(1e-3, 5.0)),
    'uniform': processes.Uniform(V),
    'uniform_geometric': processes.Uniform(V, processes.Geometric(1e-3, 5.0)),
}
NAMED = [dict(testcase_name=k, name=k) for k in PROCS]


def correlated():
  """A noisy-countdown Markov chain with full support (every sequence has p > 0)."""
  trans = np.array([[0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
  return toy.markov([0.2, 0.3, 0.5], trans, L)


def brute_joint(data, proc, t):
  """q_t over all S^L noisy sequences via the Kronecker power of expm(sigma_bar Q)."""
  k = scipy.linalg.expm(float(proc.schedule.total(t)) * proc.generator())[:V]  # rows: clean
  big = k
  for _ in range(L - 1):
    big = np.kron(big, k)
  return data.probs @ big  # (S^L,), C order as toy._all_sequences


class DataTest(parameterized.TestCase):

  def test_tables(self):
    d = toy.countdown(3, 3)
    self.assertEqual((d.vocab_size, d.length), (3, 3))
    np.testing.assert_allclose(d.probs.sum(), 1.0)
    self.assertAlmostEqual(d.table[2, 1, 0], 1 / 3)  # 2 -> 1 -> 0 is forced
    self.assertEqual(d.table[1, 1, 0], 0.0)
    ind = toy.independent([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [1 / 3] * 3])
    np.testing.assert_allclose(ind.marginals(), [[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [1 / 3] * 3])

  def test_sample_frequencies(self):
    # 40000 draws, 27 cells: binomial std <= 0.0025, tolerance 0.012.
    d = correlated()
    x = d.sample(jax.random.key(0), 40000)
    idx = np.ravel_multi_index(np.asarray(x).T, (V,) * L)
    np.testing.assert_allclose(np.bincount(idx, minlength=V ** L) / 40000, d.probs, atol=0.012)


class DenoiserTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMED)
  def test_posterior_equals_brute_force_bayes(self, name):
    proc, d = PROCS[name], correlated()
    states = d.noisy_sequences(proc)
    for t in [0.2, 0.6, 0.95]:
      q = brute_joint(d, proc, t)
      k = scipy.linalg.expm(float(proc.schedule.total(t)) * proc.generator())
      got = d.denoiser(proc)(jnp.asarray(states), jnp.full((len(states),), t))
      for n in np.flatnonzero(q > 1e-12)[::3]:
        x = states[n]
        post = np.array([d.probs[m] * np.prod(k[seq, x]) for m, seq in enumerate(d.sequences)])
        post /= post.sum()
        want = np.stack([[post[d.sequences[:, i] == a].sum() for a in range(V)]
                         for i in range(L)])
        np.testing.assert_allclose(got[n], want, atol=2e-5, err_msg=f'x={x}, t={t}')

  @parameterized.named_parameters(*NAMED)
  def test_reverse_rates_equal_exact_time_reversal(self, name):
    """R~_t(x, y) = R_t(y, x) q_t(y) / q_t(x) for every Hamming-1 neighbour y of every x."""
    proc, d = PROCS[name], correlated()
    states = d.noisy_sequences(proc)
    index = {tuple(s): n for n, s in enumerate(states)}
    q_gen = proc.generator()
    for t in [0.3, 0.8]:
      q = brute_joint(d, proc, t)
      sigma = float(proc.schedule.rate(t))
      xs = jnp.asarray(states)
      ts = jnp.full((len(states),), t)
      rates = np.asarray(proc.reverse_rates(xs, ts, d.denoiser(proc)(xs, ts)))
      for n in np.flatnonzero(q > 1e-12):
        x = states[n]
        for i, j in itertools.product(range(L), range(proc.num_states)):
          if j == x[i]:
            continue
          y = x.copy()
          y[i] = j
          want = sigma * q_gen[j, x[i]] * q[index[tuple(y)]] / q[n]
          np.testing.assert_allclose(rates[n, i, j], want, rtol=2e-4, atol=1e-5,
                                     err_msg=f'x={x}, i={i}, j={j}, t={t}')

  def test_impossible_state_falls_back(self):
    d, proc = toy.countdown(3, 3), processes.Absorbing(3)
    p = d.denoiser(proc)(jnp.array([[1, 1, 3]]), jnp.array([0.5]))  # 1 -> 1 never happens
    np.testing.assert_allclose(p[0, 2], [1 / 3] * 3, atol=1e-6)
    np.testing.assert_allclose(p[0, 0], [0, 1, 0], atol=1e-6)


class SampledDistributionTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(schedule=processes.LogLinear(), times=np.linspace(1, 1e-5, 2)),
      dict(schedule=processes.LogLinear(), times=np.linspace(1, 1e-5, 5)),
      dict(schedule=processes.LogLinear(), times=[1.0, 0.97, 0.3, 0.29, 0.01]),
      dict(schedule=processes.Geometric(), times=np.linspace(1, 0, 4)),
      dict(schedule=processes.Geometric(1e-3, 5.0), times=[1.0, 0.9, 0.5, 0.1]),
  )
  def test_independent_tokens_give_zero_kl_absorbing(self, schedule, times):
    d = toy.independent([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.0, 0.5]])
    q = d.sampled_distribution(processes.Absorbing(V, schedule), np.asarray(times))
    np.testing.assert_allclose(q.sum(), 1.0, atol=1e-5)
    self.assertLess(abs(toy.kl(d.probs, q)), 1e-5)

  def test_one_full_step_gives_product_of_marginals(self):
    # times [1, 0]: every token unmasks (dt / t = 1) from p(x^i): KL = total correlation.
    d = correlated()
    q = d.sampled_distribution(processes.Absorbing(V), [1.0, 0.0])
    prod = toy.independent(d.marginals()).probs
    np.testing.assert_allclose(q, prod, atol=1e-6)
    self.assertAlmostEqual(toy.kl(d.probs, q), toy.kl(d.probs, prod), places=5)

  def test_kl_decreases_with_nfe_absorbing(self):
    d, proc = toy.countdown(3, 3), processes.Absorbing(3)
    kls = [toy.kl(d.probs, d.sampled_distribution(proc, np.linspace(1, 1e-5, n + 1)))
           for n in (1, 2, 4, 8, 16)]
    self.assertTrue(np.all(np.diff(kls) < 0), kls)
    self.assertGreater(kls[0], 0.5)
    self.assertLess(kls[-1], 0.05)

  def test_uniform_independent_tokens_stay_independent(self):
    # Uniform tau-leaping has a time-discretisation error per token, so KL != 0 at small NFE,
    # but no cross-token error: the sampled distribution is the product of its marginals.
    d = toy.independent([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.0, 0.5]])
    q = d.sampled_distribution(processes.Uniform(V), np.linspace(1, 1e-5, 4))
    q_marg = toy.ToyData(q.reshape((V,) * L) / q.sum()).marginals()
    np.testing.assert_allclose(q, toy.independent(q_marg).probs, atol=1e-5)

  def test_uniform_converges_with_steps(self):
    d, proc = correlated(), processes.Uniform(V)
    kl = toy.kl(d.probs, d.sampled_distribution(proc, np.linspace(1, 1e-5, 129), 'marginal'))
    self.assertLess(kl, 2e-3)

  @parameterized.named_parameters(*NAMED)
  def test_matches_monte_carlo(self, name):
    """Simulate the sampler with real draws (40000 chains): frequencies within 0.012 of exact."""
    proc, d = PROCS[name], correlated()
    times = np.array([1.0, 0.7, 0.35, 0.1])
    exact = d.sampled_distribution(proc, times)
    denoise = d.denoiser(proc)
    n = 40000

    @jax.jit
    def simulate(key):
      keys = jax.random.split(key, len(times) + 1)
      x = proc.prior_sample(keys[-1], (n, L))
      ones = jnp.ones((n,))
      for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        rates = proc.reverse_rates(x, t * ones, denoise(x, t * ones))
        p = processes.tau_leaping_probs(x, rates, (t - s) * ones)
        x = jax.random.categorical(keys[i], jnp.log(p))
      return jax.random.categorical(keys[-2], jnp.log(denoise(x, times[-1] * ones)))

    x = np.asarray(simulate(jax.random.key(0)))
    freq = np.bincount(np.ravel_multi_index(x.T, (V,) * L), minlength=V ** L) / n
    np.testing.assert_allclose(freq, exact, atol=0.012)


class BadInputTest(parameterized.TestCase):

  def test_bad_tables(self):
    with self.assertRaisesRegex(ValueError, 'table'):
      toy.ToyData(np.ones((3, 2)) / 6)
    with self.assertRaisesRegex(ValueError, 'table'):
      toy.ToyData(np.ones((3, 3)))
    with self.assertRaisesRegex(ValueError, 'marginals'):
      toy.independent([[0.5, 0.6]])
    with self.assertRaisesRegex(ValueError, 'trans'):
      toy.markov([0.5, 0.5], [[1.0, 0.0]], 3)
    with self.assertRaisesRegex(ValueError, 'vocab_size'):
      toy.countdown(1, 3)

  def test_bad_sampler_inputs(self):
    d = correlated()
    with self.assertRaisesRegex(ValueError, 'vocab_size'):
      d.sampled_distribution(processes.Absorbing(4), [1.0, 0.0])
    with self.assertRaisesRegex(ValueError, 'strictly decreasing'):
      d.sampled_distribution(processes.Absorbing(V), [0.5, 1.0])
    with self.assertRaisesRegex(ValueError, r'\[0, 1\]'):
      d.sampled_distribution(processes.Absorbing(V), [1.5, 0.0])
    with self.assertRaisesRegex(ValueError, 'start'):
      d.sampled_distribution(processes.Absorbing(V), [1.0, 0.0], start='data')
    with self.assertRaisesRegex(ValueError, 'length'):
      d.denoiser(processes.Absorbing(V))(jnp.zeros((1, 2), jnp.int32), jnp.ones((1,)))


if __name__ == '__main__':
  pytest.main([__file__])
