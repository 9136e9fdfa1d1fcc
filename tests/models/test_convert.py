"""The torch <-> Flax key rule and its errors, on a small linen model with every leaf kind."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffgeo_jax.models import convert


class TinyFlax(nn.Module):
  """Same attribute names as TinyTorch: a list of blocks, a conv, a norm, an embedding, to_out.0."""

  def setup(self):
    self.embed = nn.Embed(10, 6)
    self.layers = [nn.Dense(6) for _ in range(2)]
    self.conv = nn.Conv(5, (3, 3))
    self.norm = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False)
    self.to_out_0 = nn.Dense(4)
    self.linear_1 = nn.Dense(3)

  def __call__(self, ids, img):
    h = self.embed(ids)
    for b in self.layers:
      h = b(h)
    return self.linear_1(self.to_out_0(h)), self.norm(self.conv(img))


class TinyTorch(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(10, 6)
    self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(2)])
    self.conv = torch.nn.Conv2d(2, 5, 3, padding=1)
    self.norm = torch.nn.GroupNorm(1, 5)
    self.to_out = torch.nn.ModuleList([torch.nn.Linear(6, 4)])
    self.linear_1 = torch.nn.Linear(4, 3)

  def forward(self, ids, img):
    h = self.embed(ids)
    for b in self.layers:
      h = b(h)
    return self.linear_1(self.to_out[0](h)), self.norm(self.conv(img))


@pytest.fixture(scope='module')
def setup():
  torch.manual_seed(0)
  tm = TinyTorch().eval()
  with torch.no_grad():
    tm.norm.weight.add_(torch.randn(5))
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  fm = TinyFlax()
  ids, img = np.array([[1, 2, 3]]), np.random.RandomState(0).randn(1, 4, 4, 2).astype(np.float32)
  target = convert.abstract_params(fm.init, jax.random.key(0), ids, img)
  return tm, fm, sd, target, ids, img


def test_key_rule_examples():
  assert convert.torch_key_to_flax_prefix('down_blocks.0.resnets.1.conv1.weight') == (
      'down_blocks_0', 'resnets_1', 'conv1')
  assert convert.torch_key_to_flax_prefix('a.ff.net.0.proj.bias') == ('a', 'ff', 'net_0', 'proj')
  assert convert.flax_prefix_to_torch_key(('x', 'to_out_0')) == 'x.to_out.0'
  assert convert.flax_prefix_to_torch_key(('time_embedding', 'linear_1')) == 'time_embedding.linear_1'


def test_converted_model_matches_torch_and_round_trips(setup):
  tm, fm, sd, target, ids, img = setup
  params = convert.torch_to_flax(sd, target)
  out, conv_out = fm.apply({'params': params}, ids, img)
  with torch.no_grad():
    ref, ref_conv = tm(torch.tensor(ids), torch.tensor(img).permute(0, 3, 1, 2))
  np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(conv_out, ref_conv.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  back = convert.flax_to_torch(params)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_every_problem_is_listed_in_one_error(setup):
  *_, sd, target, _, _ = setup
  bad = dict(sd)
  del bad['conv.bias']
  bad['extra.weight'] = np.zeros(3, np.float32)
  bad['layers.1.weight'] = np.zeros((7, 6), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.torch_to_flax(bad, target, source='my.safetensors')
  err = info.value
  assert err.missing == ['conv.bias']
  assert err.unexpected == ['extra.weight']
  assert err.mismatched == [('layers.1.weight', (6, 6), (6, 7))]
  text = str(err)
  for needle in ('my.safetensors', 'conv.bias', 'extra.weight', 'layers.1.weight'):
    assert needle in text


def test_ignored_buffers_and_dtype_cast(setup):
  *_, sd, target, _, _ = setup
  half = {k: v.astype(np.float16) for k, v in sd.items()}
  half['position_ids'] = np.arange(3)
  params = convert.torch_to_flax(half, target, ignore=[r'position_ids$'])
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  np.testing.assert_array_equal(params['conv']['bias'], sd['conv.bias'].astype(np.float16))
