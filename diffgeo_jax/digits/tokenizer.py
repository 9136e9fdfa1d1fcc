"""CLIP BPE tokenizer files for the digits world's caption vocabulary.

The files are a real CLIP byte-level BPE (`vocab.json`, `merges.txt`), loadable by
`transformers.CLIPTokenizer`: the 256 byte symbols and their end-of-word forms (so any text still
tokenizes), plus merges that make every vocabulary word one token.
"""

from __future__ import annotations

import json
import os
import tempfile

from diffgeo_jax.digits import dataset

# Single-token words beyond the training captions: an identifier for customization (DECOR), colour
# words the model never saw (new-concept experiments) and a few function words.
EXTRA_WORDS: tuple[str, ...] = ('sks', 'in', 'of', 'the', 'style', 'colour', 'purple', 'orange',
                                'pink', 'cyan', 'magenta', 'grey')
WORDS: tuple[str, ...] = dataset.VOCABULARY + EXTRA_WORDS
MAX_LENGTH = 12  # BOS + up to 10 words + EOS
BOS, EOS = '<|startoftext|>', '<|endoftext|>'


def byte_symbols() -> list[str]:
  """CLIP's (GPT-2's) visible symbol for each byte value 0..255, in byte order."""
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  symbols, shifted = {}, 0
  for b in range(256):
    if b in printable:
      symbols[b] = chr(b)
    else:  # non-printable bytes get code points past 255 so every byte is visible
      symbols[b] = chr(256 + shifted)
      shifted += 1
  return [symbols[b] for b in range(256)]


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair."""
  while len(word) > 1:
    pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
    rank, i = min(pairs)
    if rank == 1 << 30:
      break
    word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
  return word


def merges_for(words) -> list[tuple[str, str]]:
  """Merges under which each word of `words` is one token.

  Each new merge is appended (lowest priority), so it only applies once no earlier merge does:
  words already reduced to one token stay one token."""
  merges: list[tuple[str, str]] = []
  ranks: dict[tuple[str, str], int] = {}
  for word in words:
    pieces = list(word[:-1]) + [word[-1] + '</w>']
    pieces = _bpe(pieces, ranks)
    while len(pieces) > 1:
      pair = (pieces[0], pieces[1])
      ranks[pair] = len(merges)
      merges.append(pair)
      pieces = _bpe(pieces, ranks)
  return merges


def write(folder: str, words=WORDS, max_length: int = MAX_LENGTH) -> None:
  """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json."""
  if any(not w.isalpha() or not w.islower() for w in words):
    raise ValueError(f'words must be lower-case letters only, got {list(words)}')
  os.makedirs(folder, exist_ok=True)
  symbols = byte_symbols()
  merges = merges_for(words)
  vocab = symbols + [s + '</w>' for s in symbols]
  vocab += [a + b for a, b in merges if a + b not in vocab]
  vocab += [BOS, EOS]
  with open(os.path.join(folder, 'vocab.json'), 'w') as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  special = {'bos_token': BOS, 'eos_token': EOS, 'unk_token': EOS, 'pad_token': EOS}
  with open(os.path.join(folder, 'special_tokens_map.json'), 'w') as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'CLIPTokenizer', 'model_max_length': max_length,
               'do_lower_case': True, **special}, f, indent=2)


def load(words=WORDS, max_length: int = MAX_LENGTH):
  """The `CLIPTokenizer` that `write(folder, words, max_length)` describes, built in a temporary
  folder (the files are a function of the words alone, so every process of a run builds the same
  tokenizer without sharing a disk)."""
  from diffgeo_jax import models  # noqa: PLC0415 (models imports transformers; keep this module light)
  with tempfile.TemporaryDirectory(prefix='digits_tokenizer_') as folder:
    write(folder, words, max_length)
    return models.load_tokenizer(folder)


def vocab_size(words=WORDS) -> int:
  """Size of the vocabulary `write(folder, words)` produces (the text encoder's vocab_size)."""
  symbols = byte_symbols()
  base = set(symbols) | {s + '</w>' for s in symbols}
  new = {a + b for a, b in merges_for(words)} - base
  return 2 * len(symbols) + len(new) + 2
