"""JYS: the KLUB estimator against its closed form, the two searches against each other and
against brute force on the same objective, non-power-of-two NFE, and exact KL on toys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.discrete import jys, processes, samplers, toy

V, L = 4, 5


def first_decides():
  """The first token decides every other one: all the dependence is there at t = 1."""
  table = np.zeros((V,) * L)
  for a in range(V):
    table[(a,) * L] = 1.0 / V
  return toy.ToyData(table)


def fixed_batch(data, n=512):
  x0 = data.sample(jax.random.key(0), n)
  return x0, jax.random.uniform(jax.random.key(1), x0.shape)


class KLUBTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_closed_form_absorbing_loglinear(self, compensator):
    """Per token masked at t: (t - u)/t [KL(p_t || p_s) + log(s/t) (- 1 + t/s)] (notes §5)."""
    d, proc = toy.countdown(V, L), processes.Absorbing(V)
    den = d.denoiser(proc)
    x0, noise = fixed_batch(d)
    for s, t, u in [(0.9, 0.5, 0.2), (1.0, 0.3, 0.0), (0.4, 0.39, 0.1)]:
      got = jys.klub(den, proc, x0, noise, s, t, u, compensator=compensator)
      x_s, x_t = proc.add_noise(x0, s, noise), proc.add_noise(x0, t, noise)
      p_s = den(x_s, jnp.full((len(x0),), s))
      p_t = den(x_t, jnp.full((len(x0),), t))
      kl = jnp.sum(jnp.where(p_t > 0, p_t * (jnp.log(p_t) - jnp.log(p_s + 1e-30)), 0.0), -1)
      term = kl + np.log(s / t) + (t / s - 1 if compensator else 0.0)
      want = jnp.mean(jnp.where(x_t == V, (t - u) / t * term, 0.0))
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)

  def test_grid_objective_equals_klub(self):
    d, proc = first_decides(), processes.Absorbing(V)
    den = d.denoiser(proc)
    x0, noise = fixed_batch(d, 256)
    grid = np.linspace(1.0, 0.0, 9)
    obj = jys._GridObjective(den, proc, x0, noise, grid, compensator=False, max_rows=300)
    best, gain, n = obj.level(np.array([0, 4, 8]))  # intervals (1, .5) and (.5, 0)
    self.assertEqual(n, 6)
    klub = jax.jit(lambda s, t, u: jys.klub(den, proc, x0, noise, s, t, u))
    for i, (s, u, cands) in enumerate([(1.0, 0.5, grid[1:4]), (0.5, 0.0, grid[5:8])]):
      want = [float(klub(s, t, u)) for t in cands]
      self.assertAlmostEqual(grid[best[i]], cands[int(np.argmax(want))])
      np.testing.assert_allclose(gain[i], max(want), rtol=1e-5)


  def test_schedule_klub_closed_form(self):
    """Independent tokens, exact denoiser: the rate at a masked token is p / tau, so the per-token
    integrand is m(tau) (1 / tau) log(s / tau) = (1 - eps) log(s / tau), integrating to
    (1 - eps) [(s - u) - u log(s / u)] per step."""
    d, proc = toy.independent([[0.4, 0.3, 0.2, 0.1]] * 3), processes.Absorbing(V)
    x0 = d.sample(jax.random.key(0), 20000)
    noise = jax.random.uniform(jax.random.key(1), x0.shape)
    f = lambda s, u: (1 - 1e-3) * ((s - u) - u * np.log(s / u))
    got = jys.schedule_klub(d.denoiser(proc), proc, x0, noise, [0.8, 0.3, 0.1],
                            points_per_step=32)
    np.testing.assert_allclose(got, f(0.8, 0.3) + f(0.3, 0.1), rtol=5e-3)


class _Quadratic:
  """A stand-in objective with a known maximiser, for golden-section alone."""

  def __init__(self, peak):
    self.peak = peak

  def gains(self, s, u, cand):
    return -(cand - self.peak) ** 2


class SearchTest(parameterized.TestCase):

  def test_golden_section_finds_the_max(self):
    for peak in (0.13, 0.5, 0.871):
      t, g, n = jys._golden_interval(_Quadratic(peak), 1.0, 0.0, 0.01, 0.99, 1e-4, 32)
      self.assertAlmostEqual(t, peak, delta=1e-4)
      self.assertLess(n, 30)

  def test_parallel_and_golden_agree_and_match_brute_force(self):
    d, proc = first_decides(), processes.Absorbing(V)
    den = d.denoiser(proc)
    kw = dict(num_samples=512, grid_size=65)
    par = jys.search_with_info(den, proc, d.sample, 4, jax.random.key(3), **kw)
    gold = jys.search_with_info(den, proc, d.sample, 4, jax.random.key(3), method='golden', **kw)
    self.assertEqual(par.times.shape, (5,))
    self.assertEqual((par.times[0], par.times[-1]), (1.0, 0.0))
    self.assertTrue(np.all(np.diff(par.times) < 0))
    np.testing.assert_allclose(par.times, gold.times, atol=3 / 64)
    # Level 1 by brute force on the same objective (same data, noise): the parallel argmax.
    x0 = d.sample(jax.random.split(jax.random.key(3))[0], 512)
    noise = jax.random.uniform(jax.random.split(jax.random.key(3))[1], x0.shape)
    grid = np.linspace(1, 0, 65)
    klub = jax.jit(lambda t: jys.klub(den, proc, x0, noise, 1.0, t, 0.0))
    brute = [float(klub(t)) for t in grid[1:-1]]
    self.assertAlmostEqual(par.levels[1][1], grid[1:-1][int(np.argmax(brute))], places=6)
    np.testing.assert_allclose(par.gains[0], [max(brute)], rtol=1e-5)

  def test_any_nfe(self):
    d, proc = first_decides(), processes.Absorbing(V)
    den = d.denoiser(proc)
    res = {n: jys.search_with_info(den, proc, d.sample, n, jax.random.key(5), num_samples=256,
                                   grid_size=33) for n in (1, 2, 3, 5, 6)}
    for n, r in res.items():
      self.assertEqual(r.times.shape, (n + 1,))
      self.assertTrue(np.all(np.diff(r.times) < 0))
    # Same data and noise: N = 3 is N = 2 plus the one split of level 2 that gains most.
    self.assertTrue(set(res[2].times) <= set(res[3].times))
    self.assertLen(res[3].gains[-1], 1)
    # N = 5 and 6 share the 4-step level, then split the one / two intervals gaining most.
    np.testing.assert_allclose(res[6].levels[2], res[5].levels[2])
    self.assertLen(res[5].gains[-1], 1)
    self.assertLen(res[6].gains[-1], 2)
    self.assertAlmostEqual(max(res[6].gains[-1]), res[5].gains[-1][0])
    self.assertTrue(set(res[5].times) <= set(res[6].times))

  def test_bad_inputs(self):
    d = first_decides()
    den = d.denoiser(processes.Absorbing(V))
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, 'Absorbing'):
      jys.search(den, processes.Uniform(V), d.sample, 2, key)
    with self.assertRaisesRegex(ValueError, 'nfe'):
      jys.search(den, processes.Absorbing(V), d.sample, 0, key)
    with self.assertRaisesRegex(ValueError, 'method'):
      jys.search(den, processes.Absorbing(V), d.sample, 2, key, method='grid')
    with self.assertRaisesRegex(ValueError, 'grid_size'):
      jys.search(den, processes.Absorbing(V), d.sample, 8, key, grid_size=5)
    with self.assertRaisesRegex(ValueError, 'data_sampler'):
      jys.search(den, processes.Absorbing(V), lambda k, n: d.sample(k, n)[:, 0], 2, key)


class ExactToyTest(parameterized.TestCase):
  """Exact KL(data || sampled) of JYS and uniform schedules (the README table's claims)."""

  def test_jys_beats_uniform_when_dependence_is_early(self):
    d, proc = first_decides(), processes.Absorbing(V)
    den = d.denoiser(proc)
    for nfe in (2, 4):
      times = jys.search(den, proc, d.sample, nfe, jax.random.key(7), num_samples=512)
      kl_jys = toy.kl(d.probs, d.sampled_distribution(proc, times))
      kl_uni = toy.kl(d.probs, d.sampled_distribution(proc, samplers.uniform_times(nfe)))
      self.assertLess(kl_jys, kl_uni, (nfe, times))
      self.assertGreater(times[1], 0.5)  # more steps near t = 1

  def test_independent_tokens_any_schedule(self):
    d = toy.independent([[0.4, 0.3, 0.2, 0.1]] * 3)
    proc = processes.Absorbing(V)
    times = jys.search(d.denoiser(proc), proc, d.sample, 4, jax.random.key(8), num_samples=256)
    for sched in (times, samplers.uniform_times(4)):
      self.assertLess(abs(toy.kl(d.probs, d.sampled_distribution(proc, sched))), 1e-5)


if __name__ == '__main__':
  pytest.main([__file__])
