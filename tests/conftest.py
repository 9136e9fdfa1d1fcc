"""Shared test settings: parity tests need full-precision matmuls (TPU/GPU default to bf16 passes);
several workers may load libtpu to compile for TPU topologies."""

import os

import jax
import pytest

# First: makes the run's compilation cache folder, which the xdist workers inherit.
from tests import compile_cache

# libtpu (the [tpu] extra) takes a lockfile meant for a process that owns a real TPU; the tests
# only compile for TPU topologies, in several pytest workers at once.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
jax.config.update('jax_default_matmul_precision', 'highest')
# The workers share compiled programs with each other and with the binaries the tests run.
jax.config.update('jax_compilation_cache_dir', compile_cache.DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(compile_cache.MIN_COMPILE_SECONDS))

# Folders whose tests run binaries or notebooks as subprocesses (seconds to minutes each), marked
# `slow`: `pytest -m "not slow"` is the quick subset. (Running them first, under loadscope, made
# the run slower: two multi-host tests side by side put 4 JAX processes on CI's 2 cores.)
SLOW_FOLDERS = ('pod', 'aot', 'launch', 'colab')


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    folder = os.path.relpath(str(item.path), os.path.dirname(__file__)).split(os.sep)[0]
    if folder in SLOW_FOLDERS:
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='session')
def diffusers_pipeline_dir(tmp_path_factory):
  """A tiny StableDiffusionPipeline folder written by diffusers itself (random weights)."""
  from diffusers import DDPMScheduler, StableDiffusionPipeline
  from transformers import CLIPTokenizer

  from tests.models import oracles
  path = tmp_path_factory.mktemp('pipe')
  oracles.write_tiny_clip_tokenizer(str(path / 'tok'))
  pipe = StableDiffusionPipeline(
      vae=oracles.torch_vae(), text_encoder=oracles.torch_clip(), unet=oracles.torch_unet('sd1'),
      tokenizer=CLIPTokenizer.from_pretrained(path / 'tok'), scheduler=DDPMScheduler(),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(path / 'sd')
  return path / 'sd'


@pytest.fixture(scope='session')
def diffusers_sdxl_pipeline_dir(tmp_path_factory):
  """A tiny StableDiffusionXLPipeline folder written by diffusers (random weights): two CLIP
  encoders (the second with projection) whose 24 + 24 hidden features are the UNet's context,
  the second tokenizer padding with '!' as SDXL's does, SDXL's Euler scheduler settings."""
  import copy

  import torch
  from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
  from transformers import CLIPTokenizer

  from tests.models import oracles
  path = tmp_path_factory.mktemp('sdxl')
  oracles.write_tiny_clip_tokenizer(str(path / 'tok'))
  torch.manual_seed(0)
  unet = oracles.randomize_(UNet2DConditionModel(**{**oracles.UNET_CONFIGS['sdxl'],
                                                    'cross_attention_dim': 48}), seed=4)
  scheduler = EulerDiscreteScheduler(beta_schedule='scaled_linear', beta_start=0.00085,
                                     beta_end=0.012, steps_offset=1, timestep_spacing='leading')
  pipe = StableDiffusionXLPipeline(
      vae=oracles.torch_vae(), text_encoder=oracles.torch_clip(),
      # other weights than the first encoder's, so that swapping the two cannot go unnoticed
      text_encoder_2=oracles.randomize_(copy.deepcopy(oracles.torch_clip(True)), seed=5),
      tokenizer=CLIPTokenizer.from_pretrained(path / 'tok'),
      tokenizer_2=CLIPTokenizer.from_pretrained(path / 'tok', pad_token='!'), unet=unet,
      scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
  pipe.save_pretrained(path / 'sdxl')
  return path / 'sdxl'


@pytest.fixture(scope='session')
def diffusers_sd2_pipeline_dir(tmp_path_factory):
  """A tiny SD-2.x-style StableDiffusionPipeline folder (linear projections, per-block heads,
  upcast attention) whose scheduler predicts v (prediction_type='v_prediction')."""
  from diffusers import DDPMScheduler, StableDiffusionPipeline
  from transformers import CLIPTokenizer

  from tests.models import oracles
  path = tmp_path_factory.mktemp('sd2')
  oracles.write_tiny_clip_tokenizer(str(path / 'tok'))
  pipe = StableDiffusionPipeline(
      vae=oracles.torch_vae(), text_encoder=oracles.torch_clip(), unet=oracles.torch_unet('sd2'),
      tokenizer=CLIPTokenizer.from_pretrained(path / 'tok'),
      scheduler=DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                              prediction_type='v_prediction', steps_offset=1),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(path / 'sd2')
  return path / 'sd2'


@pytest.fixture(scope='session')
def tiny_digits_pipeline_dir(tmp_path_factory):
  """A digits pipeline folder exactly as launch/train_t2i.py exports it, with the 'tiny' config's
  random initial weights (no training)."""
  from configs.digits import t2i
  from diffgeo_jax import models
  from launch import train_t2i
  path = tmp_path_factory.mktemp('digits')
  job = train_t2i.Job(t2i.get_config('tiny'))
  params = job.init_fn(jax.random.key(0))
  models.save_pipeline(path / 'pipeline', job.pipeline(params))
  return path / 'pipeline'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  if call.when == 'call':
    from tests import report
    outcome.get_result().user_properties.extend(report.drain())


def pytest_terminal_summary(terminalreporter):
  rows = [(rep.nodeid.split('::', 1)[-1], name, value)
          for status in ('passed', 'failed') for rep in terminalreporter.stats.get(status, [])
          if rep.when == 'call' for name, value in rep.user_properties]
  if rows:
    terminalreporter.section('measurements')
    for test, name, value in sorted(rows):
      terminalreporter.write_line(f'{name}: {value}    [{test}]')
