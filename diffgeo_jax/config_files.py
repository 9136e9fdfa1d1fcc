"""Config files reading each other. absl's config flags load a config file by its path, not as a
module of a package (configs/ is not installed with the library), so a config reaches the shared
blocks of configs/common.py, or another config, by a path relative to its own file:

    common = config_files.load('../common.py', __file__)
    sd = config_files.get_config('../duo/sd14.py', __file__)
"""

import importlib.util
import os
from types import ModuleType


def load(relative: str, anchor: str) -> ModuleType:
  """The Python file at `relative` to the folder of the file `anchor` (a config's `__file__`)."""
  path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(anchor)), relative))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config file {path} ({relative!r} from {anchor})')
  name = 'config_' + os.path.relpath(path, os.path.dirname(path) + '/..').replace(
      os.sep, '_')[:-3]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(relative: str, anchor: str, arg=None):
  """`get_config(arg)` of the config file at `relative` to `anchor`."""
  return load(relative, anchor).get_config(arg)
