"""Latent geometry of diffusion models: pullback bases of h-space, Grassmann distances, spectra,
x-space editing and parallel transport.

    from diffgeo_jax.geometry import editing, pullback, grassmann, spectra
    b = pullback.local_basis(h_fn, x, num_vectors=k, num_iters=n, key=key)
    d = grassmann.geodesic_distance(b1.tangent_basis, b2.tangent_basis)
    psd = spectra.radial_psd(b.latent_basis)    # (k, n_bins)
    out = editing.edit(eps_fn, x_t, step_index, b.latent_basis[0], schedule, num_steps, gamma=0.2)
"""
