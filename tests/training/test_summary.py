"""Scalar event files: round trip, crc checks, and TensorBoard's own reader."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.training import summary


def _write_run(logdir):
  with summary.SummaryWriter(str(logdir)) as w:
    for step in range(3):
      w.scalars({'loss': 1.0 / (step + 1), 'lr': jnp.float32(0.1) * step}, step)
    w.scalar('eval/acc', np.float64(0.3), 10)
    w.scalar('big_step', -2.5, 2**40)
  return w.path


class Crc32cTest(parameterized.TestCase):

  @parameterized.parameters(summary.crc32c, summary._crc32c_python)
  def test_known_answers(self, fn):
    self.assertEqual(fn(b'123456789'), 0xE3069283)
    self.assertEqual(fn(b''), 0)
    self.assertEqual(fn(bytes(32)), 0x8A9136AA)  # RFC 3720 B.4: 32 bytes of zeros

  def test_masked(self):
    crc = 0xE3069283
    want = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32
    self.assertEqual(summary.masked_crc32c(b'123456789'), want)


def test_round_trip_exact_float32(tmp_path):
  path = _write_run(str(tmp_path))
  assert os.path.basename(path).startswith('events.out.tfevents.')
  got = summary.read_scalars(path)
  assert sorted(got) == ['big_step', 'eval/acc', 'loss', 'lr']
  assert got['loss'] == [(s, float(np.float32(1.0 / (s + 1)))) for s in range(3)]
  assert got['lr'] == [(s, float(np.float32(0.1) * s)) for s in range(3)]
  assert got['eval/acc'] == [(10, float(np.float32(0.3)))]
  assert got['big_step'] == [(2**40, -2.5)]


def test_first_record_is_file_version(tmp_path):
  path = _write_run(str(tmp_path))
  first = next(summary._records(path))
  fields = {n: v for n, _, v in summary._fields(first)}
  assert fields[3] == b'brain.Event:2'


def test_folder_merges_files_and_one_file_per_writer(tmp_path):
  logdir = str(tmp_path)
  with summary.SummaryWriter(logdir) as a, summary.SummaryWriter(logdir) as b:
    a.scalar('x', 1.0, 1)
    b.scalar('x', 2.0, 2)
  assert a.path != b.path  # in the same second the second writer gets a suffix
  assert len(os.listdir(logdir)) == 2
  assert summary.read_scalars(logdir) == {'x': [(1, 1.0), (2, 2.0)]}


def test_negative_infinite_and_nan(tmp_path):
  logdir = str(tmp_path)
  with summary.SummaryWriter(logdir) as w:
    w.scalars({'inf': 1e40, 'nan': float('nan'), 'neg': -3.0}, -1)
  got = summary.read_scalars(logdir)
  assert got['inf'] == [(-1, float('inf'))]
  assert np.isnan(got['nan'][0][1])
  assert got['neg'] == [(-1, -3.0)]


def test_disabled_writes_nothing(tmp_path):
  logdir = str(tmp_path / 'run')
  with summary.SummaryWriter(logdir, enabled=False) as w:
    w.scalar('loss', 1.0, 0)
    w.scalars({'a': 1.0}, 1)
    w.flush()
  assert not os.path.exists(logdir)
  assert w.path is None


def test_bad_values_name_the_tag(tmp_path):
  with summary.SummaryWriter(str(tmp_path)) as w:
    with pytest.raises(ValueError, match=r"scalar 'loss' must be a single number.*shape \(2,\)"):
      w.scalar('loss', jnp.ones(2), 0)
    with pytest.raises(ValueError, match='non-empty strings'):
      w.scalars({'': 1.0}, 0)
  with pytest.raises(ValueError, match='closed'):
    w.scalar('loss', 1.0, 1)


def test_flipped_byte_is_detected(tmp_path):
  path = _write_run(str(tmp_path))
  data = bytearray(open(path, 'rb').read())
  for pos, what in ((len(data) - 10, 'data'), (2, 'length')):
    bad = bytearray(data)
    bad[pos] ^= 0x01
    with open(path, 'wb') as f:
      f.write(bad)
    with pytest.raises(ValueError, match=f'corrupted record {what}'):
      summary.read_scalars(path)


def test_truncated_file_is_detected(tmp_path):
  path = _write_run(str(tmp_path))
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:-3])
  with pytest.raises(ValueError, match='truncated'):
    summary.read_scalars(path)


def test_tensorboard_reads_the_same_scalars(tmp_path):
  ea = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
  logdir = str(tmp_path)
  _write_run(logdir)
  acc = ea.EventAccumulator(logdir)
  acc.Reload()
  want = summary.read_scalars(logdir)
  assert sorted(acc.Tags()['scalars']) == sorted(want)
  for tag, points in want.items():
    assert [(e.step, e.value) for e in acc.Scalars(tag)] == points, tag
  # TensorBoard checks the crcs too (it drops a bad record), so the ones we write are right.
  path = os.path.join(logdir, os.listdir(logdir)[0])
  data = bytearray(open(path, 'rb').read())
  data[-10] ^= 0x01  # inside the last record: big_step
  with open(path, 'wb') as f:
    f.write(data)
  acc = ea.EventAccumulator(logdir)
  acc.Reload()
  assert 'big_step' not in acc.Tags()['scalars']
  assert len(acc.Scalars('loss')) == 3
