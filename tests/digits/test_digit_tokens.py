"""The digits as tokens (digits/digit_tokens.py): exact round trip to the sklearn images, invalid
sequences, the shipped classifier reading the rendered tokens."""

import numpy as np
import pytest

from diffgeo_jax.digits import dataset, digit_tokens, metrics
from tests import report


def test_round_trip_to_sklearn_images():
  from sklearn.datasets import load_digits
  raw = load_digits()
  for split in ('train', 'test'):
    tokens, digits = digit_tokens.load(split)
    idx = dataset.split_indices()[split]
    assert tokens.shape == (len(idx), 65) and tokens.dtype == np.int32
    assert tokens[:, 1:].max() <= 16 and tokens.max() < digit_tokens.VOCAB == 27
    np.testing.assert_array_equal(tokens[:, 0], 17 + raw.target[idx])
    np.testing.assert_array_equal(digits, raw.target[idx])
    strokes, labels, invalid = digit_tokens.decode(tokens)
    np.testing.assert_array_equal(strokes, (raw.images[idx] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, digits)
    assert not invalid.any()
  assert len(digit_tokens.load('train')[0]) + len(digit_tokens.load('test')[0]) == 1797


def test_decode_marks_non_grey_pixels_and_bad_labels_invalid():
  tokens, _ = digit_tokens.load('test')
  bad = tokens[:4].copy()
  bad[0, 10] = 27  # MASK in a pixel
  bad[1, 64] = 20  # a label token in a pixel
  bad[2, 0] = 5  # a grey level at the label position
  strokes, labels, invalid = digit_tokens.decode(bad)
  assert list(invalid) == [True, True, True, False]
  assert strokes[0].reshape(-1)[9] == 0.0 and strokes[1].reshape(-1)[63] == 0.0
  assert labels[2] == -1 and labels[0] == tokens[0, 0] - 17
  with pytest.raises(ValueError, match=r'tokens must be integer sequences of shape \(N, 65\)'):
    digit_tokens.decode(tokens[:, :64])


def test_shipped_classifier_reads_rendered_real_tokens():
  tokens, digits = digit_tokens.load('test')
  strokes, labels, _ = digit_tokens.decode(tokens)
  images = digit_tokens.render(strokes)
  assert images.shape == (len(tokens), 16, 16, 3)
  assert images.min() >= -1.0 and images.max() <= 1.0
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # white
  # The same pixels as the digits world's own white test images.
  np.testing.assert_allclose(images, dataset.load('test').images(digit_tokens.WHITE), atol=1e-6)
  acc = metrics.digit_accuracy(metrics.Scorer.load(batch_size=512).predict(images), labels)
  report.record('shipped classifier accuracy on rendered real test tokens', acc)
  assert acc >= 0.97
