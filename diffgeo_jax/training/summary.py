"""TensorBoard-readable scalar summaries, written and read without TensorFlow.

    with summary.SummaryWriter(workdir, enabled=jax.process_index() == 0) as w:
      w.scalars({'loss': loss, 'lr': lr}, step)
    summary.read_scalars(workdir)  # {'loss': [(step, value), ...], 'lr': [...]}

An event file is a sequence of TFRecords (uint64 length, masked crc32c of the length, the bytes,
masked crc32c of the bytes), each holding one `Event` protobuf. The few protobuf fields scalars
need are encoded by hand here:

    Event   {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}
    Summary {1: value repeated Value}
    Value   {1: tag string, 2: simple_value float}

`simple_value` is float32, so values read back are the written values rounded to float32.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import time
from typing import Iterator, Mapping

import numpy as np

from diffgeo_jax import paths

__all__ = ['SummaryWriter', 'read_scalars', 'crc32c', 'masked_crc32c']


# ---------------------------------------------------------------------------------------------
# crc32c (Castagnoli), as TFRecord framing needs it.

def _make_table() -> tuple[int, ...]:
  poly = 0x82F63B78  # the reflected Castagnoli polynomial
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_TABLE = _make_table()


def _crc32c_python(data: bytes) -> int:
  """Table-driven crc32c: slow per byte, but scalar records are a few dozen bytes."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _pick_crc32c():
  try:
    import google_crc32c
    value = google_crc32c.value
    if google_crc32c.implementation == 'c':  # its pure-python fallback is no faster than ours
      return lambda data: value(bytes(data))
  except (ImportError, AttributeError):
    pass
  try:
    from crc32c import crc32c as fn
    return lambda data: fn(bytes(data))
  except (ImportError, AttributeError):
    pass
  return _crc32c_python


crc32c = _pick_crc32c()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked crc: rotate right by 15 bits and add a constant (mod 2**32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


# ---------------------------------------------------------------------------------------------
# Protobuf wire format: just the field kinds the Event message uses.

def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64s are 10-byte two's complement varints
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           values: Mapping[str, float] | None = None) -> bytes:
  out = _varint(1 << 3 | 1) + struct.pack('<d', wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    out += _len_field(3, file_version.encode())
  if values:
    summary = b''.join(
        _len_field(1, _len_field(1, tag.encode()) + _varint(2 << 3 | 5)
                   + struct.pack('<f', v))
        for tag, v in values.items())
    out += _len_field(5, summary)
  return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result, shift = 0, 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise ValueError('malformed protobuf varint')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
  """(field number, wire type, value) for each field; value is an int for varints, else bytes."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = buf[pos:pos + size], pos + size
    elif wire == 2:
      size, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    else:
      raise ValueError(f'unsupported protobuf wire type {wire}')
    if pos > len(buf):
      raise ValueError('truncated protobuf message')
    yield number, wire, value


def _parse_scalars(event: bytes) -> tuple[int, list[tuple[str, float]]]:
  step, scalars = 0, []
  for number, wire, value in _fields(event):
    if number == 2 and wire == 0:
      step = value - (1 << 64) if value >= 1 << 63 else value
    elif number == 5 and wire == 2:
      for n, w, v in _fields(value):
        if n != 1 or w != 2:
          continue
        tag, simple = None, None
        for vn, vw, vv in _fields(v):
          if vn == 1 and vw == 2:
            tag = vv.decode()
          elif vn == 2 and vw == 5:
            simple = struct.unpack('<f', vv)[0]
        if tag is not None and simple is not None:  # other summary kinds (images, ...) skipped
          scalars.append((tag, simple))
  return step, scalars


# ---------------------------------------------------------------------------------------------

class SummaryWriter:
  """Appends scalar events to `logdir/events.out.tfevents.<time>.<hostname>` (local or gs://).

  Locally each `scalar`/`scalars` call is one record, written and flushed at once, so TensorBoard
  sees it immediately and a killed process loses nothing already logged. Cloud Storage objects
  cannot be appended to: there the records collect in memory and every `flush()` (the trainer
  flushes at each log line) rewrites the whole object, so a killed process loses only what came
  after its last flush. With `enabled=False` (every process but the first on a pod) nothing is
  created and every method does nothing.
  """

  def __init__(self, logdir, *, enabled: bool = True):
    self.enabled = enabled
    self.path = None
    self._file = None
    self._remote: bytearray | None = None
    self._closed = False
    if not enabled:
      return
    logdir = paths.resolve(logdir, 'logdir')
    base = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
    if paths.is_remote(logdir):
      self.path, n = logdir / base, 0
      while self.path.exists():  # never overwrite another writer's file of the same second
        n += 1
        self.path = logdir / f'{base}.{n}'
      self._remote = bytearray()
    else:
      os.makedirs(logdir, exist_ok=True)
      path, n = os.path.join(logdir, base), 0
      while True:  # 'x' mode: never append to another writer's file of the same second
        try:
          self._file = open(path, 'xb')
          break
        except FileExistsError:
          n += 1
          path = f'{os.path.join(logdir, base)}.{n}'
      self.path = path
    self._write(_event(time.time(), 0, file_version='brain.Event:2'))
    self.flush()

  def _write(self, event: bytes):
    if self._closed:
      raise ValueError(f'SummaryWriter for {self.path} is closed')
    if self._remote is not None:
      self._remote += _record(event)
    else:
      self._file.write(_record(event))
      self._file.flush()

  def scalar(self, tag: str, value, step: int):
    self.scalars({tag: value}, step)

  def scalars(self, values: Mapping[str, object], step: int):
    """Writes `{tag: number}` at `step`; numbers may be Python, numpy or 0-d/size-1 jax arrays."""
    if not self.enabled:
      return
    packed = {}
    for tag, value in values.items():
      if not isinstance(tag, str) or not tag:
        raise ValueError(f'summary tags must be non-empty strings, got {tag!r}')
      try:
        with np.errstate(over='ignore'):  # beyond float32's range is +-inf, as TensorFlow writes
          packed[tag] = np.asarray(value, np.float32).item()
      except (TypeError, ValueError) as e:
        shape = getattr(value, 'shape', None)
        raise ValueError(f'scalar {tag!r} must be a single number, got {type(value).__name__}'
                         f'{"" if shape is None else f" of shape {shape}"}') from e
    if packed:
      self._write(_event(time.time(), int(step), values=packed))

  def flush(self):
    if self._closed or not self.enabled:
      return
    if self._remote is not None:
      self.path.write_bytes(bytes(self._remote))
    else:
      self._file.flush()

  def close(self):
    if self.enabled and not self._closed:
      self.flush()
      if self._file is not None:
        self._file.close()
      self._closed = True

  def __enter__(self) -> SummaryWriter:
    return self

  def __exit__(self, *exc):
    self.close()


def _records(path) -> Iterator[bytes]:
  buf = paths.resolve(path).read_bytes()
  pos = 0
  while pos < len(buf):
    if pos + 12 > len(buf):
      raise ValueError(f'{path}: truncated record header at byte {pos}')
    header = buf[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', buf[pos + 8:pos + 12])
    if masked_crc32c(header) != header_crc:
      raise ValueError(f'{path}: corrupted record length at byte {pos} (crc mismatch)')
    start, end = pos + 12, pos + 12 + length
    if end + 4 > len(buf):
      raise ValueError(f'{path}: truncated record at byte {pos}')
    data = buf[start:end]
    (data_crc,) = struct.unpack('<I', buf[end:end + 4])
    if masked_crc32c(data) != data_crc:
      raise ValueError(f'{path}: corrupted record data at byte {pos} (crc mismatch)')
    yield data
    pos = end + 4


def read_scalars(path_or_dir) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value), ...]}` in write order from an event file, or from every
  `events.out.tfevents.*` file of a folder (in file name order, i.e. by creation time).

  Reads `simple_value` scalars (what this writer and PyTorch's write); other summaries are skipped.
  Raises ValueError on a crc mismatch, a truncated record or a malformed event.
  """
  where = paths.resolve(path_or_dir)
  if where.is_dir():
    files = sorted((p for p in where.iterdir() if p.name.startswith('events.out.tfevents.')),
                   key=lambda p: p.name)
  elif where.is_file():
    files = [where]
  else:
    raise FileNotFoundError(f'no event file or folder at {path_or_dir}')
  out = collections.defaultdict(list)
  for path in files:
    for data in _records(path):
      try:
        step, scalars = _parse_scalars(data)
      except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f'{path}: malformed event: {e}') from e
      for tag, value in scalars:
        out[tag].append((step, value))
  return dict(out)
