"""geometry.editing against closed forms: x-space guidance and DDIM edits on linear eps functions
(hand-computed in numpy), real-image edits on Gaussian data (exact probability-flow ODE), parallel
transport and consistent directions from exact SVDs, and an end-to-end edit with a tiny MLP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.diffusion import samplers, schedules
from diffgeo_jax.geometry import editing, grassmann, pullback
from tests import report

SHAPE = (2, 3, 2, 2)  # (B, H, W, C)
N = int(np.prod(SHAPE[1:]))
T = 1000


def sd_schedule():
  return schedules.scaled_linear(T, 0.00085, 0.012, set_alpha_to_one=False, steps_offset=1)


def linear_eps(seed=0):
  """eps(x, t) = c(t) A x per sample, c(t) = 1 + t / T; A (N, N) with spectral norm 0.5."""
  rng = np.random.RandomState(seed)
  a = rng.randn(N, N)
  a = 0.5 * a / np.linalg.norm(a, 2)
  a32 = jnp.asarray(a, jnp.float32)
  c = lambda t: 1.0 + t / T
  fn = lambda x, t: (c(t) * (x.reshape(x.shape[0], -1) @ a32.T)).reshape(x.shape)
  return fn, a, c


def hand_ddim(a, c, x, s, num_steps, first_step):
  """DDIM (eta 0) with eps = c(t) A x, in float64 numpy: the textbook update on diffusers' grid."""
  table = np.asarray(s.alphas_cumprod, np.float64)
  ts = s.inference_timesteps(num_steps)
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  for t in ts[first_step:]:
    prev = t - T // num_steps
    ab, ap = table[t], (table[prev] if prev >= 0 else float(s.final_alpha_cumprod))
    eps = c(t) * x @ a.T
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
  return x


def rand(seed, shape=SHAPE):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


class XSpaceGuidanceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_linear_eps_closed_form(self):
    eps_fn, a, c = linear_eps()
    x, t, gamma, delta, n = rand(1), 400.0, 0.3, 0.7, 5
    for v in (rand(2, SHAPE[1:]), rand(3)):  # one shared direction, one per sample
      fn = self.variant(lambda x, v, g: editing.x_space_guidance(
          eps_fn, x, t, v, gamma=g, delta=delta, num_steps=n))
      xs = fn(x, v, gamma)
      chex.assert_shape(xs, (n + 1,) + SHAPE)
      av = (np.broadcast_to(np.asarray(v), SHAPE).reshape(SHAPE[0], -1) @ a.T).reshape(SHAPE)
      expected = np.asarray(x)[None] + (np.arange(n + 1) * gamma * delta * c(t))[
          :, None, None, None, None] * av[None]  # each step adds gamma delta c(t) A v
      err = float(np.abs(np.asarray(xs) - expected).max())
      report.record(f'x-space guidance, linear eps, {n} steps: max abs err ({self.variant.type})',
                    err)
      np.testing.assert_allclose(xs, expected, atol=1e-5)
      np.testing.assert_array_equal(xs[0], x)
      zero = fn(x, v, 0.0)  # gamma = 0: the identity, bit for bit
      np.testing.assert_array_equal(zero, np.broadcast_to(np.asarray(x), zero.shape))

  def test_zero_steps_returns_the_start(self):
    eps_fn, *_ = linear_eps()
    xs = editing.x_space_guidance(eps_fn, rand(1), 10, rand(2, SHAPE[1:]), gamma=1.0, num_steps=0)
    chex.assert_trees_all_equal(xs, rand(1)[None])

  @parameterized.named_parameters(
      ('direction_shape', dict(direction=np.zeros((3, 2, 2, 2), np.float32)), 'direction must'),
      ('direction_int', dict(direction=np.zeros((3, 2, 2), np.int32)), 'direction must be a float'),
      ('gamma_vector', dict(gamma=np.ones(2)), 'gamma must be a scalar'),
      ('gamma_str', dict(gamma='1'), 'gamma must be a real'),
      ('gamma_bool', dict(gamma=True), 'gamma must be a real'),
      ('delta_vector', dict(delta=[1.0, 2.0]), 'delta must be a scalar'),
      ('negative_steps', dict(num_steps=-1), 'num_steps must be an int'),
      ('unbatched_x', dict(x_t=np.zeros(3, np.float32)), 'x_t must be a floating-point batch'),
  )
  def test_bad_arguments_are_named(self, override, message):
    eps_fn, *_ = linear_eps()
    args = dict(x_t=rand(1), t=5, direction=rand(2, SHAPE[1:]), gamma=1.0) | override
    with pytest.raises(ValueError, match=message):
      editing.x_space_guidance(eps_fn, **args)


class EditTest(chex.TestCase):

  def test_gamma_zero_is_plain_ddim_on_the_same_grid(self):
    eps_fn, *_ = linear_eps()
    s, n, k = sd_schedule(), 10, 3
    x_T = rand(4)
    full, traj = samplers.ddim(eps_fn, x_T, s, n, return_trajectory=True)
    x_t = traj.x_t[k]
    r, plain = jax.jit(lambda x, v: (
        editing.edit(eps_fn, x, k, v, s, n, gamma=0.0, guidance_steps=3),
        samplers.ddim(eps_fn, x, s, n, first_step=k)))(x_t, rand(2, SHAPE[1:]))
    chex.assert_trees_all_equal(r.x0, plain)
    chex.assert_trees_all_equal(r.x0_reference, plain)
    chex.assert_trees_all_equal(r.x_start, x_t)
    self.assertEqual(float(r.t), float(s.inference_timesteps(n)[k]))
    err = float(jnp.abs(r.x0 - full).max())  # resuming at step k reproduces the uninterrupted run
    report.record('edit gamma=0 from DDIM step 3/10 vs the uninterrupted DDIM run: max abs', err)
    np.testing.assert_allclose(r.x0, full, atol=1e-5)

  def test_linear_eps_matches_hand_computed_ddim_for_a_gamma_strip(self):
    eps_fn, a, c = linear_eps()
    s, n, k, steps, delta = sd_schedule(), 10, 4, 4, 0.5
    gammas = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    x_t, v = rand(5), rand(6, SHAPE[1:])
    frames = editing.official_frames(steps, 2)
    self.assertEqual(frames, [0, 2, 4])
    r = jax.jit(lambda x, v, g: editing.edit(eps_fn, x, k, v, s, n, gamma=g, delta=delta,
                                             guidance_steps=steps, frame_steps=frames,
                                             return_trajectory=True))(x_t, v, gammas)
    chex.assert_shape(r.x0, (4, 3) + SHAPE)  # (gammas, frames, B, ...)
    chex.assert_shape(r.trajectory.x_t, (4, 3, n - k) + SHAPE)
    t_k = float(s.inference_timesteps(n)[k])
    av = (np.asarray(v).reshape(1, -1) @ a.T).reshape(SHAPE[1:])
    worst = 0.0
    for gi, g in enumerate(gammas):
      for fi, f in enumerate(frames):
        guided = np.asarray(x_t, np.float64) + f * g * delta * c(t_k) * av  # closed form
        np.testing.assert_allclose(r.x_t[gi, fi], guided, atol=1e-5)
        expected = hand_ddim(a, c, guided, s, n, k).reshape(SHAPE)
        worst = max(worst, float(np.abs(np.asarray(r.x0[gi, fi]) - expected).max()))
    report.record('edit (linear eps, 4 gammas x 3 frames) vs hand DDIM float64: max abs', worst)
    assert worst < 1e-4, worst
    np.testing.assert_allclose(r.x0[1, 2], r.x0_reference, atol=1e-6)  # gamma 0 row
    np.testing.assert_allclose(hand_ddim(a, c, x_t, s, n, k).reshape(SHAPE), r.x0_reference,
                               atol=1e-4)

  def test_guidance_eps_fn_guides_and_eps_fn_denoises(self):
    """Text-conditioned edits guide with the edit prompt's model and denoise with the other."""
    eps_fn, a, c = linear_eps()
    s, n, k, steps = sd_schedule(), 10, 2, 3
    x_t, v = rand(10), rand(11, SHAPE[1:])

    def run(x, v):
      r = editing.edit(eps_fn, x, k, v, s, n, gamma=0.5, guidance_steps=steps,
                       guidance_eps_fn=lambda x, t: 2.0 * eps_fn(x, t))
      return r, samplers.ddim(eps_fn, r.x_t, s, n, first_step=k)  # denoised with eps_fn

    r, again = jax.jit(run)(x_t, v)
    t_k = float(s.inference_timesteps(n)[k])
    av = (np.asarray(v).reshape(1, -1) @ a.T).reshape(SHAPE[1:])
    np.testing.assert_allclose(r.x_t, np.asarray(x_t) + steps * 0.5 * 2.0 * c(t_k) * av, atol=1e-5)
    chex.assert_trees_all_close(r.x0, again, atol=1e-6)

  def test_bad_arguments_are_named(self):
    eps_fn, *_ = linear_eps()
    s, x_t, v = sd_schedule(), rand(1), rand(2, SHAPE[1:])
    with pytest.raises(ValueError, match='gamma must be a scalar or an array with at most 1'):
      editing.edit(eps_fn, x_t, 0, v, s, 5, gamma=np.ones((2, 2)))
    with pytest.raises(ValueError, match='step_index must be in'):
      editing.edit(eps_fn, x_t, 5, v, s, 5, gamma=1.0)
    with pytest.raises(ValueError, match='frame_steps must be'):
      editing.edit(eps_fn, x_t, 0, v, s, 5, gamma=1.0, guidance_steps=2, frame_steps=[0, 3])
    with pytest.raises(ValueError, match='direction must have the shape'):
      editing.edit(eps_fn, x_t, 0, v[None, None], s, 5, gamma=1.0)
    with pytest.raises(ValueError, match='edit_t must be in'):
      editing.edit_step_index(s, 100, 1.5)

  def test_edit_step_index_is_the_official_argmin(self):
    s = schedules.linear(T, timestep_spacing='linspace')  # grid 999, 989, ..., 0 for 100 steps
    ts = s.inference_timesteps(100)
    for edit_t in (1.0, 0.8, 0.6):
      i = editing.edit_step_index(s, 100, edit_t)
      self.assertEqual(i, int(np.argmin(np.abs(ts - edit_t * 1000))))
    self.assertEqual(editing.edit_step_index(s, 100, 1.0), 0)
    self.assertEqual(editing.official_frames(16, 4), [0, 4, 8, 12, 16])


MU, SIGMA0 = 0.3, 0.7


def gaussian_eps(s):
  """The exact eps prediction for data N(MU, SIGMA0^2) (as in tests/diffusion/test_samplers.py)."""
  def fn(x, t):
    ab = s.alpha_cumprod_at(t)
    a, sd = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    x0 = MU + a * SIGMA0 ** 2 * (x - a * MU) / (a ** 2 * SIGMA0 ** 2 + sd ** 2)
    return (x - a * x0) / sd
  return fn


class EditRealTest(chex.TestCase):

  def test_gamma_zero_round_trip_and_exact_ode_inversion(self):
    """For Gaussian data the probability-flow ODE is solvable: in x/sqrt(ab), the deviation from
    MU scales by sqrt(SIGMA0^2 + sigma^2) / SIGMA0. DDIM inversion approximates it to first
    order in the step size."""
    s = sd_schedule()
    eps_fn = gaussian_eps(s)
    x_0 = MU + SIGMA0 * rand(7)
    seen = []
    direction_fn = lambda x_t: seen.append(x_t.shape) or jnp.ones(SHAPE[1:]) / np.sqrt(N)
    errs = {}
    for n, k in ((50, 20), (200, 83)):  # the same edit timestep t = 581, 4x the steps
      r = jax.jit(lambda x: editing.edit_real(eps_fn, x, s, n, k, direction_fn, gamma=0.0,
                                              guidance_steps=2))(x_0)
      t = int(s.inference_timesteps(n)[k])
      ab = float(s.alphas_cumprod[t])
      sig2 = (1 - ab) / ab
      exact = np.sqrt(ab) * (MU + (np.asarray(x_0) - MU) * np.sqrt(SIGMA0 ** 2 + sig2) / SIGMA0)
      inv_err = float(np.abs(np.asarray(r.x_start) - exact).max())
      errs[n] = float(jnp.abs(r.x0_reference - x_0).max())
      report.record(f'DDIM inversion to t={t} ({n - k} of {n} steps) vs exact ODE: max abs',
                    inv_err)
      report.record(f'edit_real gamma=0, {n} steps, edit at t={t}: round-trip max abs err', errs[n])
      chex.assert_trees_all_equal(r.x0, r.x0_reference)
      assert inv_err < 0.1, inv_err
    self.assertEqual(seen, [SHAPE, SHAPE])
    assert errs[200] < 0.3 * errs[50] and errs[200] < 2e-2, errs

  def test_constant_eps_inverts_exactly_to_the_grid_step(self):
    """eps(x, t) = e: DDIM and its inversion are then exact inverses (in x / sqrt(ab) each step
    adds -/+ (sigma_t - sigma_prev) e), and the inverted x at grid step k has a closed form."""
    s, n = sd_schedule(), 10
    e = rand(9)
    eps_fn = lambda x, t: jnp.broadcast_to(e, x.shape)
    x_0 = rand(8)
    table, ts = np.asarray(s.alphas_cumprod, np.float64), s.inference_timesteps(n)
    a_f = float(s.final_alpha_cumprod)  # the alpha_bar the first inversion step reads x_0 at
    sigma = lambda ab: np.sqrt((1 - ab) / ab)
    for k in (0, 7):
      ab = table[ts[k]]
      exact = np.sqrt(ab) * (np.asarray(x_0) / np.sqrt(a_f)
                             + (sigma(ab) - sigma(a_f)) * np.asarray(e))
      r = jax.jit(lambda x: editing.edit_real(eps_fn, x, s, n, k, rand(2, SHAPE[1:]), gamma=0.0,
                                              guidance_steps=1))(x_0)
      np.testing.assert_allclose(r.x_start, exact, atol=1e-5)  # the inverted x at step k
      err = float(jnp.abs(r.x0 - x_0).max())
      report.record(f'edit_real gamma=0, constant eps, edit at step {k}/{n}: round-trip max abs',
                    err)
      assert err < 1e-5, err


def svd_basis(w, k=None, x_shape=None, h_shape=None):
  """The exact LocalBasis of h = W x (sign-fixed like local_basis)."""
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  k = len(s) if k is None else k
  v, u = vt[:k], u[:, :k].T
  sign = np.sign(v[np.arange(k), np.argmax(np.abs(v), axis=1)])
  v, u = v * sign[:, None], u * sign[:, None]
  x_shape = x_shape or (w.shape[1],)
  h_shape = h_shape or (w.shape[0],)
  f = lambda a: jnp.asarray(a, jnp.float32)
  return pullback.LocalBasis(f(s[:k]), f(v).reshape(k, *x_shape), f(u).reshape(k, *h_shape),
                             jnp.int32(0), jnp.bool_(True), f(0.0))


def random_map(seed, m=6, n=8):
  return np.random.RandomState(seed).randn(m, n)


class ParallelTransportTest(chex.TestCase):

  def test_same_linear_map_is_the_identity(self):
    h_fn = lambda x: jnp.asarray(random_map(0), jnp.float32) @ x
    basis = jax.jit(lambda x, key: pullback.local_basis(h_fn, x, 4, 100, key, tol=1e-6))
    b0, b1 = (basis(rand(s, (8,)), jax.random.key(s)) for s in (1, 2))
    # each u_{0,i} comes back as v_{1,i} = v_{0,i}: the basis is the same everywhere
    out = editing.parallel_transport(b0, b1, [0, 1, 2, 3])
    err = float(jnp.abs(out - b0.latent_basis).max())
    report.record('parallel transport, same linear map: max abs deviation from identity', err)
    np.testing.assert_allclose(out, b0.latent_basis, atol=1e-4)
    np.testing.assert_allclose(editing.parallel_transport(b0, b1, 2), b0.latent_basis[2],
                               atol=1e-4)

  def test_two_linear_maps_match_the_formula(self):
    w0, w1 = random_map(1), random_map(2)
    b0, b1 = svd_basis(w0, 4), svd_basis(w1, 4)
    u_cols = np.linalg.svd(w1, full_matrices=False)[0][:, :4]  # U_1 (m, k), columns
    vt1 = np.linalg.svd(w1, full_matrices=False)[2][:4]  # V_1^T (k, n)
    sign = np.sign(vt1[np.arange(4), np.argmax(np.abs(vt1), axis=1)])
    u_cols, vt1 = u_cols * sign, vt1 * sign[:, None]
    u0 = np.asarray(b0.tangent_basis)
    for i in range(4):
      v = vt1.T @ (u_cols.T @ u0[i])  # the official vT_1.T @ (u_1.T @ u_0[:, k])
      v /= np.linalg.norm(v)
      out = np.asarray(editing.parallel_transport(b0, b1, i))
      np.testing.assert_allclose(out, v, atol=1e-5)
      self.assertAlmostEqual(float(np.linalg.norm(out)), 1.0, places=5)
      in_span = vt1.T @ (vt1 @ out)  # lies in span(V_1)
      np.testing.assert_allclose(in_span, out, atol=1e-5)
    # a raw tangent vector (not a basis index) goes the same way
    u = np.random.RandomState(3).randn(6)
    v = vt1.T @ (u_cols.T @ u)
    np.testing.assert_allclose(editing.parallel_transport(b0, b1, jnp.asarray(u, jnp.float32)),
                               v / np.linalg.norm(v), atol=1e-5)

  def test_transport_latent_direction(self):
    w0, w1 = random_map(4), random_map(5)
    b0, b1 = svd_basis(w0), svd_basis(w1)  # full rank k = 6: J_0 v_0 is exact
    np.testing.assert_allclose(editing.transport_latent_direction(b0, b1, b0.latent_basis[1]),
                               editing.parallel_transport(b0, b1, 1), atol=1e-5)
    v0 = np.random.RandomState(6).randn(8)
    u0 = w0 @ v0 / np.linalg.norm(w0 @ v0)
    np.testing.assert_allclose(editing.latent_to_tangent(b0, jnp.asarray(v0, jnp.float32)), u0,
                               atol=1e-5)
    np.testing.assert_allclose(
        editing.transport_latent_direction(b0, b1, jnp.asarray(v0, jnp.float32)),
        editing.parallel_transport(b0, b1, jnp.asarray(u0, jnp.float32)), atol=1e-5)

  def test_bad_arguments_are_named(self):
    b0, b1 = svd_basis(random_map(1), 3), svd_basis(random_map(2, n=9), 3)
    with pytest.raises(ValueError, match='same spaces'):
      editing.parallel_transport(b0, b1, 0)
    with pytest.raises(ValueError, match='tangent indices must be in'):
      editing.parallel_transport(b0, b0, 3)
    with pytest.raises(ValueError, match='tangent must be'):
      editing.parallel_transport(b0, b0, jnp.zeros(5))
    with pytest.raises(ValueError, match='direction must have the latent shape'):
      editing.latent_to_tangent(b0, jnp.zeros(6))


class ConsistentDirectionsTest(parameterized.TestCase):

  @parameterized.parameters('transport', 'sign')
  def test_identical_samples_and_sign_flips(self, method):
    b = svd_basis(random_map(7), 4, x_shape=(2, 4), h_shape=(3, 2))
    same = editing.consistent_directions([b, b, b], num_directions=3, method=method)
    chex.assert_shape(same.directions, (3, 3, 2, 4))
    for s in range(3):
      np.testing.assert_allclose(same.directions[s], b.latent_basis[:3], atol=1e-5)
    np.testing.assert_allclose(same.alignment, np.ones((3, 3)), atol=1e-5)
    np.testing.assert_allclose(same.mean, b.latent_basis[:3], atol=1e-5)
    # Flip the signs of sample 1's pairs (u_i, v_i) 0 and 2: the result must not change.
    flip = jnp.asarray([-1.0, 1.0, -1.0, 1.0])
    b_flip = b.replace(latent_basis=b.latent_basis * flip[:, None, None],
                       tangent_basis=b.tangent_basis * flip[:, None, None])
    other = svd_basis(random_map(8), 4, x_shape=(2, 4), h_shape=(3, 2))
    ref = editing.consistent_directions([b, other], method=method)
    flipped = editing.consistent_directions(
        jax.tree.map(lambda *a: jnp.stack(a), b_flip, other), reference=1, method=method)
    unflipped = editing.consistent_directions([b, other], reference=1, method=method)
    np.testing.assert_allclose(flipped.directions, unflipped.directions, atol=1e-5)
    np.testing.assert_allclose(ref.directions[0], b.latent_basis, atol=1e-5)

  def test_transport_method_is_parallel_transport(self):
    bs = [svd_basis(random_map(s), 4) for s in (9, 10, 11)]
    c = editing.consistent_directions(bs, reference=2, num_directions=2)
    for s in range(3):
      np.testing.assert_allclose(c.directions[s], editing.parallel_transport(bs[2], bs[s], [0, 1]),
                                 atol=1e-5)
    coeff = np.asarray(bs[2].tangent_basis[:2]) @ np.asarray(bs[0].tangent_basis).T
    np.testing.assert_allclose(c.alignment[0], np.linalg.norm(coeff, axis=1), atol=1e-5)

  def test_bad_arguments_are_named(self):
    b = svd_basis(random_map(7), 4)
    with pytest.raises(ValueError, match='method must be one of'):
      editing.consistent_directions([b], method='frechet')
    with pytest.raises(ValueError, match='num_directions must be at most'):
      editing.consistent_directions([b], num_directions=5)
    with pytest.raises(ValueError, match=r'bases\[1\]'):
      editing.consistent_directions([b, svd_basis(random_map(7), 3)])
    with pytest.raises(ValueError, match='reference must'):
      editing.consistent_directions([b, b], reference=2)
    with pytest.raises(ValueError, match='stacked along a leading sample axis'):
      editing.consistent_directions(b)  # one unstacked basis


class TextConditionedBasisTest(chex.TestCase):

  def test_basis_under_a_prompt_and_a_contrast(self):
    w0, w1 = (jnp.asarray(random_map(s), jnp.float32) for s in (12, 13))
    h_fn_for = lambda c: (lambda x: (w0 + c[0] * w1) @ x)  # a "prompt embedding" c (1,)
    x, key = rand(14, (8,)), jax.random.key(0)
    c, c2 = jnp.array([2.0]), jnp.array([0.5])
    b = jax.jit(lambda x: editing.text_conditioned_basis(h_fn_for, x, c, 3, 200, key, tol=1e-6))(x)
    truth = svd_basis(np.asarray(w0 + 2.0 * w1, np.float64), 3)
    d = float(grassmann.geodesic_distance(b.latent_basis, truth.latent_basis))
    np.testing.assert_allclose(b.singular_values, truth.singular_values, rtol=1e-4)
    # contrast: J_c - J_c' = 1.5 W1, so the basis is W1's
    bc = jax.jit(lambda x: editing.text_conditioned_basis(h_fn_for, x, c, 3, 200, key,
                                                          contrast_context=c2, tol=1e-6))(x)
    truth_c = svd_basis(np.asarray(w1, np.float64), 3)
    dc = float(grassmann.geodesic_distance(bc.latent_basis, truth_c.latent_basis))
    report.record('text-conditioned basis d_geo to SVD (prompt / contrast)', f'{d:.2e} / {dc:.2e}')
    assert d < 1e-2 and dc < 1e-2, (d, dc)
    np.testing.assert_allclose(bc.singular_values, 1.5 * truth_c.singular_values, rtol=1e-4)


class EndToEndTest(chex.TestCase):

  def test_top_latent_direction_edits_more_than_random_ones(self):
    """eps = Q h(x) with Q an isometry (orthonormal columns): d eps/dx = Q J, so one guidance step
    moves x_t by ~ gamma delta ||J v||, largest for v = v_1 (the top right singular vector of J):
    guaranteed to first order in delta for x_t. For x_0 (after the nonlinear DDIM) it is
    measured."""
    rng = np.random.RandomState(0)
    n, m = 32, 18
    w1 = jnp.asarray(rng.randn(n, n) / np.sqrt(n), jnp.float32)
    w2 = jnp.asarray(rng.randn(m, n) / np.sqrt(n), jnp.float32)
    q = jnp.asarray(np.linalg.qr(rng.randn(n, m))[0], jnp.float32)  # (n, m) isometry
    h_fn = lambda x: w2 @ jnp.tanh(w1 @ x.reshape(-1))  # one sample (4, 4, 2) -> (18,)
    eps_fn = lambda x, t: jax.vmap(lambda xi: (q @ h_fn(xi)).reshape(xi.shape))(x)
    s, steps, k = sd_schedule(), 10, 3
    x_t = jnp.asarray(rng.randn(1, 4, 4, 2), jnp.float32)
    b = jax.jit(lambda x: pullback.local_basis(h_fn, x, 2, 200, jax.random.key(0), tol=1e-6))(
        x_t[0])
    num_random = 16
    rand_dirs = rng.randn(num_random, n)
    rand_dirs /= np.linalg.norm(rand_dirs, axis=1, keepdims=True)
    dirs = jnp.concatenate([b.latent_basis[:1],
                            jnp.asarray(rand_dirs.reshape(num_random, 4, 4, 2), jnp.float32)])
    batch = jnp.broadcast_to(x_t, dirs.shape)  # one copy of x_t per direction
    r = jax.jit(lambda x, d: editing.edit(eps_fn, x, k, d, s, steps, gamma=0.5, delta=0.3,
                                          guidance_steps=4))(batch, dirs)
    dxt = np.linalg.norm(np.asarray(r.x_t - batch).reshape(len(dirs), -1), axis=1)
    dx0 = np.linalg.norm(np.asarray(r.x0 - r.x0_reference).reshape(len(dirs), -1), axis=1)
    report.record('e2e: sigma_1 / mean sigma of random dirs',
                  f'{float(b.singular_values[0]):.3f} / '
                  f'{float(np.mean(pullback.jvp_norms(h_fn, x_t[0], dirs[1:]))):.3f}')
    report.record('e2e: ||x_t edit - x_t|| top v1 vs random (max / mean)',
                  f'{dxt[0]:.4f} vs {dxt[1:].max():.4f} / {dxt[1:].mean():.4f}')
    report.record('e2e: ||x_0 edit - x_0 ref|| top v1 vs random (max / mean)',
                  f'{dx0[0]:.4f} vs {dx0[1:].max():.4f} / {dx0[1:].mean():.4f}')
    assert dxt[0] > dxt[1:].max(), dxt
    assert dx0[0] > dx0[1:].max(), dx0
