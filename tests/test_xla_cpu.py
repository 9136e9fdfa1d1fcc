"""The XLA:CPU flag added at import: only when measured, never over the user's choice."""

from unittest import mock

from diffgeo_jax import _xla_cpu


def _apply(env, version='0.10.2'):
  with mock.patch.dict('os.environ', env, clear=True), \
       mock.patch.object(_xla_cpu, '_jaxlib_version', return_value=version):
    changed = _xla_cpu.apply()
    import os
    return changed, os.environ.get('XLA_FLAGS')


def test_added_to_existing_flags():
  assert _apply({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}) == (
      True, '--xla_force_host_platform_device_count=8 ' + _xla_cpu._FLAG)


def test_respects_user_choice_opt_out_and_unmeasured_versions():
  user = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
  assert _apply({'XLA_FLAGS': user}) == (False, user)
  assert _apply({'DIFFGEO_JAX_XLA_CPU_TUNING': '0'}) == (False, None)
  assert _apply({}, version='0.11.0') == (False, None)
  assert _apply({}, version=None) == (False, None)
