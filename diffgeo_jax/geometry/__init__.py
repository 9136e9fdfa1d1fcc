"""Latent geometry of diffusion models: pullback bases of h-space, Grassmann distances, spectra,
x-space editing and parallel transport, curvedness of segments.

    from diffgeo_jax.geometry import curvedness, editing, grassmann, pullback, spectra
    b = pullback.local_basis(h_fn, x, num_vectors=k, num_iters=n, key=key)
    d = grassmann.geodesic_distance(b1.tangent_basis, b2.tangent_basis)
    psd = spectra.radial_psd(b.latent_basis)    # (k, n_bins)
    out = editing.edit(eps_fn, x_t, step_index, b.latent_basis[0], schedule, num_steps, gamma=0.2)
    c = curvedness.segment(h_fn, x0, x1, kind='chord_arc')

Imports run one way: grassmann and spectra are leaves, pullback uses grassmann, editing and
curvedness use pullback (editing also the samplers of `diffusion`). Nothing here imports
`models`, `training` or the pipelines: the geometry works on any `h_fn` / `eps_fn` (a UNet object
is passed in to `pullback.unet_h_fn`; `distributed` is imported lazily by the sharded bases).
"""
