"""The layout rules of the library, checked on the import graph (no TensorFlow needed).

* no import cycle among the modules of ``bijectors`` and ``tfflows``;
* building blocks (bijectors, nn, distributions, data, split permutations, ...) never import a
  model, and models never import the analyses and tools above them (lcma, export, sampling,
  interpolation);
* the library never imports the program (``train``), and programs live in ``train/``;
* no module imports Keras' private ``keras.src`` but ``bijectors.keras_compat``, whose Keras is
  the one setup.cfg allows.

Imports inside functions count: a deferred import is still a dependency.
"""

import ast
import configparser
import importlib.metadata
import os

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('bijectors', 'tfflows')
MODELS = 'tfflows.models'
# Modules above the models: they take a built model (analyses, tools).
ABOVE_MODELS = ('tfflows.lcma', 'tfflows.export', 'tfflows.sampling', 'tfflows.interpolation',
                'tfflows.ood', 'tfflows.serving_warmup')
# The programs kept in the library: each rebuilds the data file shipped next to it.
PROGRAMS_IN_LIBRARY = {'tfflows.data.make_embedded', 'tfflows.data.make_ood_sets'}
# The one module allowed to import keras.src (Keras has no public API for what it does).
KERAS_PRIVATE_ADAPTER = 'bijectors.keras_compat'


def _modules(packages=PACKAGES):
  """{module name: path} for every .py file of the packages."""
  found = {}
  for package in packages:
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if not name.endswith('.py'):
          continue
        rel = os.path.relpath(os.path.join(directory, name), ROOT)[:-3].split(os.sep)
        if rel[-1] == '__init__':
          rel = rel[:-1]
        found['.'.join(rel)] = os.path.join(directory, name)
  return found


def _imported(path):
  """[(module, name or None)] of every absolute import in the file (top level or inside
  functions): ``import a.b`` gives ('a.b', None), ``from a import b`` gives ('a', 'b')."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.extend((a.name, None) for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.extend((node.module, a.name) for a in node.names)
  return out


def _imports(path, known):
  """Internal modules imported anywhere in the file."""
  names = {f'{m}.{n}' if n and f'{m}.{n}' in known else m for m, n in _imported(path)}
  return {n for n in names if n.split('.')[0] in PACKAGES + ('train',)}


def _graph():
  modules = _modules()
  known = set(modules)
  return {m: _imports(p, known) for m, p in modules.items()}


def _in(module, prefix):
  return module == prefix or module.startswith(prefix + '.')


def _cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        result.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return result


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def _layer(module):
  if _in(module, MODELS):
    return 1
  if any(_in(module, m) for m in ABOVE_MODELS) or module == 'tfflows':
    return 2
  return 0  # building blocks


@pytest.mark.parametrize('what', ['building blocks', 'models'])
def test_dependencies_point_down(what):
  """Building blocks import no model; models import no analysis; nothing imports train."""
  graph = _graph()
  layer = {'building blocks': 0, 'models': 1}[what]
  wrong = sorted(f'{m} imports {d}' for m, deps in graph.items() if _layer(m) == layer
                 for d in deps if d.split('.')[0] == 'train' or _layer(d) > layer)
  assert wrong == []


def test_library_never_imports_the_program():
  wrong = sorted(f'{m} imports {d}' for m, deps in _graph().items() for d in deps
                 if d.split('.')[0] == 'train')
  assert wrong == []


def test_programs_live_in_train():
  programs = set()
  for module, path in _modules().items():
    with open(path, encoding='utf-8') as f:
      if "__name__ == '__main__'" in f.read():
        programs.add(module)
  assert programs - PROGRAMS_IN_LIBRARY == set()


def test_the_cycle_detector_sees_a_cycle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def _keras_private_imports(path):
  """The ``keras.src`` modules a file imports (``from keras import src`` included)."""
  names = {f'{m}.{n}' if n else m for m, n in _imported(path)}
  return {n for n in names if n == 'keras.src' or n.startswith('keras.src.')}


def test_only_the_adapter_imports_keras_private_modules():
  modules = _modules(PACKAGES + ('train',))
  wrong = sorted(f'{m} imports {", ".join(sorted(found))}' for m, path in modules.items()
                 for found in [_keras_private_imports(path)]
                 if found and m != KERAS_PRIVATE_ADAPTER)
  assert wrong == []
  assert _keras_private_imports(modules[KERAS_PRIVATE_ADAPTER])   # the check sees imports


def test_installed_keras_is_the_one_setup_cfg_allows():
  """bijectors.keras_compat relies on keras.src as it is in the Keras versions setup.cfg
  allows: the Keras installed must be one of them."""
  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, 'setup.cfg'))
  requirements = [Requirement(line) for line in
                  setup['options']['install_requires'].split('\n') if line.strip()]
  keras_range = next(r.specifier for r in requirements if r.name == 'keras')
  installed = importlib.metadata.version('keras')
  assert keras_range.contains(installed), (installed, str(keras_range))
