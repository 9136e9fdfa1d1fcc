"""Hub model ids through the huggingface_hub cache: a cache laid out as huggingface_hub writes it
(in a temp HF_HOME, checked with `scan_cache_dir`) resolves by id offline, at a branch or a commit;
missing ids, revisions and parts are named errors; a download asks only for a pipeline's files."""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from diffgeo_jax import digits, models
from diffgeo_jax.models import hub

REPO = 'someone/tiny-digits'
COMMIT_MAIN = 'a' * 40
COMMIT_DEV = 'b' * 40


def _blob_name(data: bytes, lfs: bool) -> str:
  """huggingface_hub names LFS blobs by sha256, other files by their git blob sha1."""
  if lfs:
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def add_snapshot(cache, repo_id, commit, folder, ref=None, skip=()):
  """Writes `folder` into `cache` as huggingface_hub does: blobs/<hash>, snapshots/<commit>/<path>
  as relative symlinks into blobs/, refs/<ref> holding the commit (no newline)."""
  repo = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
  for root, _, files in os.walk(folder):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel.split(os.sep)[0] in skip:
        continue
      with open(os.path.join(root, name), 'rb') as f:
        data = f.read()
      blob = os.path.join(repo, 'blobs', _blob_name(data, name.endswith('.safetensors')))
      os.makedirs(os.path.dirname(blob), exist_ok=True)
      with open(blob, 'wb') as f:
        f.write(data)
      link = os.path.join(repo, 'snapshots', commit, rel)
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  if ref:
    os.makedirs(os.path.join(repo, 'refs'), exist_ok=True)
    with open(os.path.join(repo, 'refs', ref), 'w') as f:
      f.write(commit)


@pytest.fixture(scope='module')
def pipelines(tmp_path_factory):
  """The shipped digits pipeline, and a copy whose scheduler config differs (a second commit)."""
  base = tmp_path_factory.mktemp('pipes')
  main = base / 'main'
  shutil.copytree(digits.pipeline_dir(), main)
  dev = base / 'dev'
  shutil.copytree(main, dev)
  sched = json.loads((dev / 'scheduler' / 'scheduler_config.json').read_text())
  sched['beta_end'] = 0.03
  (dev / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(sched))
  return main, dev


@pytest.fixture
def hf_home(tmp_path, monkeypatch, pipelines):
  """A temp HF_HOME whose hub cache holds REPO (main -> COMMIT_MAIN, dev -> COMMIT_DEV), offline,
  with the working directory somewhere that has no `someone/` folder."""
  home = tmp_path / 'hf'
  cache = home / 'hub'
  add_snapshot(cache, REPO, COMMIT_MAIN, pipelines[0], ref='main')
  add_snapshot(cache, REPO, COMMIT_DEV, pipelines[1], ref='dev')
  for var in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('HF_HOME', str(home))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  work = tmp_path / 'cwd'
  work.mkdir()
  monkeypatch.chdir(work)
  return cache


def test_the_hand_written_cache_is_what_huggingface_hub_sees(hf_home):
  from huggingface_hub import scan_cache_dir, snapshot_download
  info = scan_cache_dir(hf_home)
  assert not info.warnings, info.warnings
  (repo,) = info.repos
  assert (repo.repo_id, repo.repo_type) == (REPO, 'model')
  assert {r.commit_hash: sorted(r.refs) for r in repo.revisions} == {
      COMMIT_MAIN: ['main'], COMMIT_DEV: ['dev']}
  assert any(f.file_name == 'diffusion_pytorch_model.safetensors'
             for r in repo.revisions for f in r.files)
  # huggingface_hub's own offline lookup agrees with ours.
  want = os.path.join(hf_home, 'models--someone--tiny-digits', 'snapshots', COMMIT_MAIN)
  assert snapshot_download(REPO, cache_dir=hf_home, local_files_only=True) == want
  assert hub.cache_dir() == str(hf_home)
  assert hub.resolve(REPO) == want


def _assert_same_pipeline(a, b):
  for name in ('unet_params', 'text_encoder_params'):
    la, lb = jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))
    assert len(la) == len(lb) > 0
    assert all(np.array_equal(x, y) for x, y in zip(la, lb)), name
  assert a.unet.config == b.unet.config


def test_load_pipeline_by_id_offline_equals_the_folder(hf_home, pipelines):
  direct = models.load_pipeline(str(pipelines[0]))
  by_id = models.load_pipeline(REPO)
  _assert_same_pipeline(by_id, direct)
  assert by_id.scheduler_config == direct.scheduler_config
  # A branch and a full commit hash resolve to their own snapshots.
  dev = models.load_pipeline(REPO, revision='dev')
  assert dev.scheduler_config['beta_end'] == 0.03 != direct.scheduler_config['beta_end']
  _assert_same_pipeline(dev, direct)
  assert hub.resolve(REPO, revision=COMMIT_DEV).endswith(os.path.join('snapshots', COMMIT_DEV))
  assert hub.resolve(REPO, revision=COMMIT_MAIN) == hub.resolve(REPO, revision='main')


def test_missing_id_revision_and_parts_are_named_errors(hf_home, tmp_path):
  with pytest.raises(hub.HubModelNotFoundError) as info:
    models.load_pipeline('nobody/nothing')
  msg = str(info.value)
  for part in ("'nobody/nothing' is not a local folder", str(hf_home), "revision 'main'",
               'HF_HUB_OFFLINE is set'):
    assert part in msg, (part, msg)
  assert (info.value.repo_id, info.value.cache_dir) == ('nobody/nothing', str(hf_home))
  with pytest.raises(hub.HubModelNotFoundError, match=r"revision 'v9'.*HF_HUB_OFFLINE"):
    hub.resolve(REPO, revision='v9')
  with pytest.raises(hub.HubModelNotFoundError, match='local_files_only=True'):
    hub.resolve('nobody/nothing', local_files_only=True)
  # A snapshot without a part that model_index.json names is incomplete, not half-loaded.
  add_snapshot(hf_home, 'someone/partial', 'c' * 40, digits.pipeline_dir(), ref='main',
               skip=('unet',))
  with pytest.raises(hub.HubModelNotFoundError, match=r'incomplete snapshot.*missing unet/'):
    models.load_pipeline('someone/partial')
  # Local paths are returned unchanged; a revision there is an error.
  assert hub.resolve(str(tmp_path)) == str(tmp_path)
  assert hub.resolve('gs://bucket/sd15') == 'gs://bucket/sd15'
  with pytest.raises(ValueError, match="revision='main' is read only for a hub model id"):
    models.load_pipeline(str(tmp_path), revision='main')
  # Paths that cannot be hub ids never reach the hub.
  for path in ('./a/b', 'a/b/c', '/a/b', '~/a', 'a--b/c'):
    assert not hub.is_hub_id(path), path
  os.makedirs('someone/local')  # an existing relative folder wins over the id
  assert hub.resolve('someone/local') == 'someone/local'


SDXL_LISTING = [
    '.gitattributes', 'README.md', 'model_index.json', 'sd_xl_base_1.0.safetensors',
    'sd_xl_offset_example-lora_1.0.safetensors',
    'scheduler/scheduler_config.json',
    'text_encoder/config.json', 'text_encoder/model.safetensors',
    'text_encoder/model.fp16.safetensors',
    'text_encoder/flax_model.msgpack', 'text_encoder/openvino_model.bin',
    'text_encoder/openvino_model.xml', 'text_encoder/model.onnx', 'text_encoder/pytorch_model.bin',
    'text_encoder_2/config.json', 'text_encoder_2/model.safetensors',
    'text_encoder_2/model.fp16.safetensors', 'text_encoder_2/model.onnx_data',
    'tokenizer/merges.txt', 'tokenizer/special_tokens_map.json', 'tokenizer/tokenizer_config.json',
    'tokenizer/vocab.json', 'tokenizer_2/merges.txt', 'tokenizer_2/special_tokens_map.json',
    'tokenizer_2/tokenizer_config.json', 'tokenizer_2/vocab.json',
    'unet/config.json', 'unet/diffusion_pytorch_model-00001-of-00002.safetensors',
    'unet/diffusion_pytorch_model-00002-of-00002.safetensors',
    'unet/diffusion_pytorch_model.safetensors.index.json',
    'unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors',
    'unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors',
    'unet/diffusion_pytorch_model.safetensors.index.fp16.json',
    'unet/diffusion_flax_model.msgpack', 'unet/model.onnx', 'unet/openvino_model.bin',
    'unet/diffusion_pytorch_model.bin.index.json',
    'vae/config.json', 'vae/diffusion_pytorch_model.safetensors',
    'vae/diffusion_pytorch_model.bin', 'vae_1_0/config.json',
    'vae_1_0/diffusion_pytorch_model.safetensors', 'vae_decoder/model.onnx',
    'safety_checker/config.json', 'safety_checker/model.safetensors',
    'feature_extractor/preprocessor_config.json',
]
SDXL_INDEX = {'_class_name': 'StableDiffusionXLPipeline', 'force_zeros_for_empty_prompt': True,
              **{k: ['diffusers' if k in ('unet', 'vae', 'scheduler') else 'transformers', 'X']
                 for k in ('scheduler', 'text_encoder', 'text_encoder_2', 'tokenizer',
                           'tokenizer_2', 'unet', 'vae', 'safety_checker')},
              'feature_extractor': [None, None]}


def test_pipeline_files_are_what_load_pipeline_reads():
  configs = ['model_index.json', 'scheduler/scheduler_config.json', 'text_encoder/config.json',
             'text_encoder_2/config.json',
             *[f'{t}/{f}' for t in ('tokenizer', 'tokenizer_2') for f in
               ('merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json')],
             'unet/config.json', 'vae/config.json']
  plain = sorted(configs + [
      'text_encoder/model.safetensors', 'text_encoder_2/model.safetensors',
      'unet/diffusion_pytorch_model-00001-of-00002.safetensors',
      'unet/diffusion_pytorch_model-00002-of-00002.safetensors',
      'unet/diffusion_pytorch_model.safetensors.index.json',
      'vae/diffusion_pytorch_model.safetensors'])
  assert sorted(hub.pipeline_files(SDXL_LISTING, SDXL_INDEX)) == plain
  fp16 = sorted(configs + [
      'text_encoder/model.fp16.safetensors', 'text_encoder_2/model.fp16.safetensors',
      'unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors',
      'unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors',
      'unet/diffusion_pytorch_model.safetensors.index.fp16.json',
      'vae/diffusion_pytorch_model.safetensors'])  # no fp16 vae: the plain one
  assert sorted(hub.pipeline_files(SDXL_LISTING, SDXL_INDEX, variant='fp16')) == fp16


def test_download_asks_only_for_the_pipeline_files(hf_home, monkeypatch, tmp_path):
  """Online (HF_HUB_OFFLINE unset) and not cached: model_index.json, the listing at its commit,
  then one snapshot_download of exactly `pipeline_files` (the hub calls are faked: no network)."""
  import huggingface_hub
  monkeypatch.delenv('HF_HUB_OFFLINE')
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
  snap = tmp_path / 'models--big--sdxl' / 'snapshots' / ('d' * 40)
  snap.mkdir(parents=True)
  (snap / 'model_index.json').write_text(json.dumps(SDXL_INDEX))
  calls = []

  def fake_hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **kw):
    calls.append(('file', repo_id, filename, revision, cache_dir))
    return str(snap / filename)

  def fake_list(self, repo_id, revision=None, **kw):
    calls.append(('list', repo_id, revision))
    return SDXL_LISTING

  def fake_snapshot(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kw):
    calls.append(('snapshot', repo_id, revision, cache_dir, sorted(allow_patterns)))
    return str(snap)

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_hf_hub_download)
  monkeypatch.setattr(huggingface_hub.HfApi, 'list_repo_files', fake_list)
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_snapshot)
  assert hub.resolve('big/sdxl', revision='v1') == str(snap)
  assert calls == [('file', 'big/sdxl', 'model_index.json', 'v1', str(hf_home)),
                   ('list', 'big/sdxl', 'd' * 40),
                   ('snapshot', 'big/sdxl', 'd' * 40, str(hf_home),
                    sorted(hub.pipeline_files(SDXL_LISTING, SDXL_INDEX)))]
  # The cached id is still served from the cache, without any call.
  calls.clear()
  assert hub.resolve(REPO).endswith(COMMIT_MAIN) and calls == []

  # A hub error names the id and what failed.
  from huggingface_hub import errors

  def not_found(*a, **kw):
    raise errors.LocalEntryNotFoundError('connection refused')

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', not_found)
  with pytest.raises(hub.HubModelNotFoundError, match=r"'big/other'.*downloading it failed "
                     r'\(fetching model_index.json: LocalEntryNotFoundError: connection refused'):
    hub.resolve('big/other')
