"""The package layout: model/ and data/ import nothing from train/ or tools/, and the code
version that marks stale study results covers every sub-folder."""
import ast
import os
import shutil

import pytest

from stas_jax.train import run_files

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'stas_jax')


def _imports(path):
  """Every module name a file imports (absolute), including function-level imports."""
  tree = ast.parse(open(path).read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.append(node.module)
      names += [f'{node.module}.{a.name}' for a in node.names]
  return names


@pytest.mark.parametrize('layer', ['model', 'data'])
def test_lower_layers_import_nothing_from_train_or_tools(layer):
  folder = os.path.join(PACKAGE, layer)
  files = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith('.py')]
  assert len(files) > 3
  for path in files:
    bad = [n for n in _imports(path)
           if n.startswith(('stas_jax.train', 'stas_jax.tools'))]
    assert not bad, f'{os.path.relpath(path, PACKAGE)} imports {bad}'


def test_model_does_not_import_data():
  folder = os.path.join(PACKAGE, 'model')
  for name in os.listdir(folder):
    if name.endswith('.py'):
      bad = [n for n in _imports(os.path.join(folder, name)) if n.startswith('stas_jax.data')]
      assert not bad, f'model/{name} imports {bad}'


def test_code_version_walks_every_sub_folder(tmp_path):
  copy = tmp_path / 'stas_jax'
  shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns('__pycache__'))
  base = run_files.source_digest(str(copy))
  assert base == run_files.code_version()
  for rel in ('model/halting.py', 'train/loop.py', 'tools/ablate.py', 'data/augment.py',
              '__init__.py'):
    path = copy / rel
    original = path.read_text()
    path.write_text(original + '\n# changed\n')
    assert run_files.source_digest(str(copy)) != base, rel
    path.write_text(original)
  assert run_files.source_digest(str(copy)) == base
  # A file moved to another folder is another version, though its bytes are the same.
  (copy / 'model' / 'halting.py').rename(copy / 'train' / 'halting.py')
  assert run_files.source_digest(str(copy)) != base
  # Non-Python files and caches do not count.
  (copy / 'train' / 'halting.py').rename(copy / 'model' / 'halting.py')
  (copy / 'model' / 'notes.txt').write_text('x')
  (copy / 'model' / '__pycache__').mkdir()
  (copy / 'model' / '__pycache__' / 'x.py').write_text('y')
  assert run_files.source_digest(str(copy)) == base
