"""The digits dataset, captions and tokenizer."""

import numpy as np
import pytest

from diffgeo_jax import models
from diffgeo_jax.digits import dataset, tokenizer


def test_upsample_is_linear_interpolation_at_pixel_centres():
  ramp = np.tile(np.arange(8, dtype=np.float64), (8, 1))[None]  # value = column index
  out = dataset.upsample(ramp)[0]
  expected = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
  np.testing.assert_allclose(out, np.tile(expected, (16, 1)), atol=1e-6)
  np.testing.assert_allclose(dataset.upsample(np.full((1, 8, 8), 0.3)), 0.3, atol=1e-6)
  with pytest.raises(ValueError, match=r'strokes must have shape \(N, 8, 8\)'):
    dataset.upsample(np.zeros((2, 16, 16)))


def test_render_paints_the_stroke_in_the_palette_colour():
  strokes = dataset.load('test').strokes[:3]
  for k, (name, rgb) in enumerate(dataset.PALETTE.items()):
    img = dataset.render(strokes, np.full(3, k))
    for ch in range(3):
      np.testing.assert_allclose(img[..., ch], strokes * rgb[ch] * 2 - 1, atol=1e-6, err_msg=name)
  assert img.min() >= -1 and img.max() <= 1


def test_split_is_disjoint_complete_stratified_and_seeded():
  idx = dataset.split_indices()
  train, test = idx['train'], idx['test']
  assert len(np.intersect1d(train, test)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
  counts = np.bincount(dataset.load('test').digits, minlength=10)
  assert counts.min() >= 34 and counts.max() <= 37  # 20% of 174..183 per digit
  np.testing.assert_array_equal(dataset.split_indices()['test'], test)
  assert not np.array_equal(dataset.split_indices(seed=1)['test'], test)
  with pytest.raises(ValueError, match='split must be one of'):
    dataset.load('validation')


def test_captions_round_trip_and_unknown_words_name_the_vocabulary():
  for d in range(10):
    for c, name in enumerate(dataset.COLOURS):
      text = dataset.caption(d, c)
      assert text == f'a {name} digit {dataset.DIGIT_WORDS[d]}'
      assert dataset.parse_caption(text) == (d, c)
  with pytest.raises(ValueError, match=r"words outside the digits vocabulary: \['purple'\].*"
                     r"Colours: \['red', 'green', 'blue', 'yellow', 'white'\]"):
    dataset.check_prompt('a purple digit three')
  with pytest.raises(ValueError, match=r"\['eleven'\].*digits: \['zero', 'one'"):
    dataset.parse_caption('a red digit eleven')
  assert dataset.check_prompt('a purple digit three', extra_words=('purple',))
  with pytest.raises(ValueError, match='colour must be one of'):
    dataset.caption(3, 'purple')
  with pytest.raises(ValueError, match='digit must be in 0..9'):
    dataset.caption(10, 0)


def test_sample_batch_matches_captions_and_drops_about_ten_percent():
  split = dataset.load('train')
  b = dataset.sample_batch(np.random.default_rng(0), split, 4000, empty_caption_prob=0.1)
  empty = np.array([c == '' for c in b['captions']])
  # Binomial(4000, 0.1): mean 400, sd 19.
  assert 330 < empty.sum() < 470
  for text, d, c in zip(np.array(b['captions'])[~empty][:200], b['digits'][~empty],
                        b['colours'][~empty]):
    assert dataset.parse_caption(text) == (d, c)
  rgb = np.asarray(list(dataset.PALETTE.values()))[b['colours']]
  # The brightest pixel of each image has the caption's colour.
  flat = (b['images'].reshape(4000, -1, 3) + 1) / 2
  top = flat[np.arange(4000), flat.sum(-1).argmax(1)]
  np.testing.assert_allclose(top / top.max(-1, keepdims=True), rgb, atol=1e-6)


def test_tokenizer_makes_each_word_one_token(tmp_path):
  tokenizer.write(str(tmp_path))
  tok = models.load_tokenizer(str(tmp_path))
  assert len(tok) == tokenizer.vocab_size()
  assert tok.model_max_length == tokenizer.MAX_LENGTH
  ids = {w: tok(w).input_ids for w in tokenizer.WORDS}
  for w, i in ids.items():
    assert len(i) == 3, (w, i)  # BOS, the word, EOS
  assert len({i[1] for i in ids.values()}) == len(tokenizer.WORDS)  # all distinct
  assert tok.convert_ids_to_tokens(ids['three'][1]) == 'three</w>'
  # Words outside the vocabulary still tokenize (into byte pieces), never to nothing.
  assert len(tok('zebra').input_ids) > 3
  with pytest.raises(ValueError, match='lower-case letters only'):
    tokenizer.write(str(tmp_path / 'bad'), words=('Red',))
