"""The Colab notebooks, executed on CPU with small settings, so that none of them silently rots.

Each notebook has one code cell tagged `parameters`; the test keeps its source and appends small
overrides (so a parameter added later keeps its default), runs every cell with nbclient in a fresh
kernel (cwd = repository root, JAX_PLATFORMS=cpu), and reads the notebook's own final check from
its printed output.

Which Python runs the kernel: kernel_name 'python3' is looked up in JUPYTER_PATH, then the user's
~/.local/share/jupyter/kernels, then sys.prefix, then the system folders, so a user-level
'python3' spec of some other Python would shadow this venv's. The test therefore writes its own
spec (`ipykernel.kernelspec.install(prefix=<tmp>)`, whose argv[0] is sys.executable) and gives
the kernel manager a KernelSpecManager that searches only that folder: the kernel is always the
interpreter running pytest, with no dependence on environment variables or user files.
"""

import os
import re
import sys

import nbformat
import pytest

from tests import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLAB = os.path.join(ROOT, 'colab')
CELL_TIMEOUT_S = 240  # per cell; the whole latent_geometry run takes ~30 s on 2 CPU cores


def _notebook(name: str):
  return nbformat.read(os.path.join(COLAB, name), as_version=4)


def _parameters_cell(nb):
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'expected one cell tagged "parameters", found {len(tagged)}'
  assert tagged[0].cell_type == 'code'
  return tagged[0]


def _kernel_manager(tmp_path):
  from ipykernel import kernelspec
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager
  prefix = tmp_path / 'kernel'
  kernelspec.install(kernel_name='python3', prefix=str(prefix))
  ksm = KernelSpecManager(kernel_dirs=[str(prefix / 'share' / 'jupyter' / 'kernels')])
  km = AsyncKernelManager(kernel_name='python3', kernel_spec_manager=ksm)
  assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
  return km


def execute(name: str, overrides: str, tmp_path):
  """Runs notebook `name` with `overrides` appended to its parameters cell; returns it executed."""
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError
  nb = _notebook(name)
  cell = _parameters_cell(nb)
  cell.source = cell.source + '\n\n# tests/colab/test_notebooks.py overrides\n' + overrides
  from jupyter_client.utils import run_sync
  km = _kernel_manager(tmp_path)
  client = NotebookClient(nb, km=km, kernel_name='python3',
                          timeout=CELL_TIMEOUT_S, resources={'metadata': {'path': ROOT}})
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  try:
    client.execute(cwd=ROOT, env=env)
  except CellExecutionError as e:
    pytest.fail(f'{name} failed:\n{str(e)[-4000:]}')
  finally:
    # nbclient leaves a kernel it was handed running: each held ~1 GB until the end of the run.
    if run_sync(km.is_alive)():
      run_sync(km.shutdown_kernel)(now=True)
  return nb


def _stdout(cell) -> str:
  return ''.join(o.get('text', '') for o in cell.get('outputs', [])
                 if o.output_type == 'stream' and o.name == 'stdout')


@pytest.mark.parametrize('name', sorted(f for f in os.listdir(COLAB) if f.endswith('.ipynb')))
def test_saved_notebook_is_clean(name):
  """Saved without outputs, valid nbformat 4, one `parameters` cell (what the executor needs)."""
  nb = _notebook(name)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for c in nb.cells:
    if c.cell_type == 'code':
      assert not c.outputs and c.execution_count is None, f'outputs saved in:\n{c.source[:200]}'
  _parameters_cell(nb)


def test_latent_geometry_runs_and_its_basis_is_an_svd(tmp_path):
  nb = execute('latent_geometry.ipynb', '\n'.join([
      'SEEDS = (0,)',  # with the two default prompts: two samples
      'NUM_STEPS = 10',
      'TIMES = (0.9, 0.3)',
      'NUM_VECTORS = 2',
      'NUM_ITERS = 3',
      'EDIT_GAMMAS = (-0.6, 0.0, 0.6)',
      'GUIDANCE_STEPS = 2',
  ]), tmp_path)
  code = [c for c in nb.cells if c.cell_type == 'code']
  figures = sum('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  assert figures >= 8, f'expected the notebook\'s plots, got {figures} images'
  last = _stdout(code[-1])
  match = re.search(r'J v_1 = sigma_1 u_1: relative error ([-+.\deE]+|nan|inf)', last)
  assert match, f'the final check did not print its result:\n{last}'
  err = float(match.group(1))
  report.record('J v_1 vs sigma_1 u_1 relative error (digits U-Net, CPU)', err)
  assert err < 1e-4, last
  # gamma = 0 is no edit: the edit strip's middle column equals the unedited sample.
  edit_out = next(_stdout(c) for c in code if 'mean |pixel change|' in _stdout(c))
  zero = re.search(r'gamma \+0\.00: mean \|pixel change\| along v_1 ([\d.]+)', edit_out)
  assert zero and float(zero.group(1)) < 1e-4, edit_out


def test_resolution_runs_and_guidance_moves_toward_the_native_sample(tmp_path):
  nb = execute('resolution.ipynb', '\n'.join([
      'NUM_STEPS = 2',
      'DIGITS = (0, 3, 7)',
      'SAMPLES_PER_DIGIT = 1',
      'SWITCH_SAMPLES_PER_DIGIT = 1',
      'SWITCH_TIMES = (995, 500, 0)',
  ]), tmp_path)
  code = [c for c in nb.cells if c.cell_type == 'code']
  figures = sum('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  assert figures >= 6, f'expected the notebook\'s plots, got {figures} images'
  last = _stdout(code[-1])
  match = re.search(r'final check: peaks (\d+) (\d+) (\d+) (\d+); \|D\(x\) - native\| plain '
                    r'([\d.]+) guided ([\d.]+)', last)
  assert match, f'the final check did not print its result:\n{last}'
  peaks = [int(match.group(i)) for i in range(1, 5)]
  plain, guided = float(match.group(5)), float(match.group(6))
  report.record('resolution notebook: mean |D(x) - native| plain (CPU, 2 steps)', plain)
  report.record('resolution notebook: mean |D(x) - native| guided (CPU, 2 steps)', guided)
  # The digits DDPM-linear schedule's chromatogram peaks for m = 1, 2, 4, 8.
  assert peaks[0] == 219 and peaks[1] in (407, 408) and peaks[2:] == [546, 656], last
  assert guided < plain, last
  # The guided prediction keeps the full-resolution detail exactly, its pooled part is eps_low/m.
  parts_out = next(_stdout(c) for c in code if 'max |D eps_hat' in _stdout(c))
  for name in (r'\(I - UD\) eps_hat - \(I - UD\) eps', r'D eps_hat - eps_low / m'):
    err = re.search(name + r'\|\s*= ([-+.\deE]+)', parts_out)
    assert err and float(err.group(1)) < 1e-4, parts_out
  # Switching after the last grid timestep (t_s = 0) keeps the first colour everywhere; switching
  # before the first (t_s = 995) never sees it.
  table = next(_stdout(c) for c in code if 'keeps red' in _stdout(c))
  rows = {int(r.split()[0]): [float(v) for v in r.split()[1:3]]
          for r in table.splitlines() if re.match(r'\s*\d+\s+[\d.]+\s+[\d.]+', r)}
  assert rows[0][0] == 1.0 and rows[995][0] == 0.0, table


def test_jump_your_steps_runs_and_the_cde_chain_holds(tmp_path):
  nb = execute('jump_your_steps.ipynb', '\n'.join([
      'TOY_VOCAB, TOY_LENGTH = 3, 3',
      'TOY_NFES = (2, 4)',
      'NUM_SAMPLES = 64',
      'GRID_SIZE = 17',
      'MODEL_NFES = (2, 4)',
      'EVAL_SAMPLES = 16',
  ]), tmp_path)
  code = [c for c in nb.cells if c.cell_type == 'code']
  figures = sum('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  assert figures >= 3, f'expected the notebook\'s plots, got {figures} images'
  last = _stdout(code[-1])
  match = re.search(r'final check: KL <= sum CDE on (\d+) schedules \(worst margin '
                    r'([-+.\deE]+)\): (OK|FAILED)', last)
  assert match, f'the final check did not print its result:\n{last}'
  assert int(match.group(1)) == 4 and match.group(3) == 'OK', last
  assert float(match.group(2)) < 0, last
  # The uniform / JYS error table of the trained model has one row per NFE, rates in [0, 1].
  table = next(_stdout(c) for c in code if 'uniform' in _stdout(c) and 'JYS' in _stdout(c)
               and 'NFE' in _stdout(c) and 'sum CDE' not in _stdout(c))
  rows = [r.split() for r in table.splitlines() if re.match(r'\s*\d+\s+[\d.]+\s+[\d.]+$', r)]
  assert [int(r[0]) for r in rows] == [2, 4], table
  assert all(0 <= float(v) <= 1 for r in rows for v in r[1:]), table


def test_duo_runs_and_the_lora_at_scale_zero_is_the_base(tmp_path):
  nb = execute('duo.ipynb', '\n'.join([
      f'WORKDIR = {str(tmp_path / "duo")!r}',
      "CONFIG_ARG = 'tiny'",
      'EVAL_SAMPLES = 4',
      'EVAL_STEPS = 10',
      'ATTACK_STEPS = 3',
  ]), tmp_path)
  code = [c for c in nb.cells if c.cell_type == 'code']
  figures = sum('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  assert figures >= 4, f'expected the notebook\'s plots, got {figures} images'
  assert (tmp_path / 'duo' / 'lora').is_dir()
  last = _stdout(code[-1])
  assert 'final check: LoRA at scale 0 reproduces the base samples exactly: OK' in last, last
  attack = next(_stdout(c) for c in code if 'attack:' in _stdout(c))
  assert "'moved'" in attack, attack


def test_decor_runs_and_strength_zero_is_the_plain_pipeline(tmp_path):
  nb = execute('decor.ipynb', '\n'.join([
      f'WORKDIR = {str(tmp_path / "decor")!r}',
      "CONFIG_ARG = 'tiny'",
      'SAMPLES_PER_DIGIT = 1',
      'EVAL_STEPS = 5',
      'STRENGTHS = (0.0, 1.0)',
  ]), tmp_path)
  code = [c for c in nb.cells if c.cell_type == 'code']
  figures = sum('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  assert figures >= 2, f'expected the notebook\'s plots, got {figures} images'
  assert (tmp_path / 'decor' / 'lora').is_dir()
  energy = next(_stdout(c) for c in code if 'energy of the top 4' in _stdout(c))
  assert 'share of component 1 on the PAD rows' in energy, energy
  last = _stdout(code[-1])
  assert 'final check: strength 0 is the plain pipeline and the projection matches: OK' in last, \
      last


def test_goar_runs_and_vmapped_retraining_equals_one_model(tmp_path):
  nb = execute('goar.ipynb', "CONFIG_ARG = 'tiny'\nSEEDS = (0, 1)", tmp_path)
  code = [c for c in nb.cells if c.cell_type == 'code']
  figures = sum('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  assert figures >= 1, f'expected the notebook\'s plot, got {figures} images'
  rho = next(_stdout(c) for c in code if 'Spearman with the ground-truth' in _stdout(c))
  assert "'goar'" in rho, rho
  last = _stdout(code[-1])
  assert 'final check: vmapped retraining equals one model trained alone: OK' in last, last
