"""Command-line flags of ``python -m train.main``: training flags and one flag per model field.

Training flags are written out below, each with its help. Model flags are generated from the
fields of ``tfflows.FlowConfig`` (``--width=64``, ``--block_conf=6,4,1`` for tuples), so a field
added to the config becomes a flag with no change here; its help comes from ``MODEL_HELP``, else
from the field's ``metadata['help']``, else from the comment beside the field in config.py.

A flagfile holds one ``--flag=value`` a line; flags after ``--flagfile`` on the command line
override the file's values (absl reads flags left to right, the last value wins).
"""

import dataclasses
import inspect
import io
import os
import textwrap
import tokenize

from absl import flags

from tfflows.config import RETIRED_FIELDS, FlowConfig
from tfflows.data.pipeline import DATASETS

FLAGS = flags.FLAGS

# ------------------------------------------------------------------------------ the program
flags.DEFINE_string(
    'mode', 'train',
    'What to run: one mode or a comma list run in order in one invocation, e.g. '
    '"train,eval,sample,export" (the quick start). Modes: train, eval, sample, interpolate, '
    'export, memorization, ood (out-of-distribution AUROCs; docs/ood.md), lcma_analyze '
    '(LCMA phase 2; docs/lcma.md).')
flags.DEFINE_string(
    'workdir', None,
    'Directory of the run: config.json, flags.txt, checkpoints/, best/, tensorboard/, eval/, '
    'samples/, export/. Rerunning the same command resumes from it.')
flags.DEFINE_string('checkpoint', 'latest', 'Checkpoint used by eval, sample, interpolate, '
                    'export and memorization: latest, best, or a checkpoint prefix / directory.')
flags.DEFINE_integer('verbose', 1, 'Progress display: 1 a progress bar on a terminal and a few '
                     'plain lines elsewhere (log files stay small), 2 plain lines only, 0 none. '
                     'Results and the per-epoch line are printed in every case.',
                     lower_bound=0, upper_bound=2)
flags.DEFINE_integer('seed', 0, 'Seed of weight initialisation, data order, augmentation and '
                     'the noise of eval and samples.')
flags.DEFINE_bool('deterministic', False, 'Deterministic data pipeline and TF ops '
                  '(tf.config.experimental.enable_op_determinism); slower.')

# ------------------------------------------------------------------------------------- data
flags.DEFINE_enum('dataset', 'mnist_embedded', sorted(DATASETS),
                  'Dataset (tfflows.data.DATASETS). mnist_embedded ships with the package.')
flags.DEFINE_string('data_dir', None, 'TFDS data_dir, or the directory of the image-net.org '
                    'downsampled ImageNet npz batches.')
flags.DEFINE_bool('flip', True, 'Random horizontal flips of training images.')
flags.DEFINE_integer('translate_pixels', 0, 'Random translations of training images by up to '
                     'this many pixels each way (DenseFlow); 0: off.', lower_bound=0)

# --------------------------------------------------------------------------------- training
flags.DEFINE_integer('batch_size', 64, 'Global training batch size (split across replicas).',
                     lower_bound=1)
flags.DEFINE_integer('epochs', 1, 'Epochs to train (in total, counting resumed ones).',
                     lower_bound=0)
flags.DEFINE_integer('steps_per_epoch', 0, 'Training steps an epoch; 0: training images // '
                     'batch_size.', lower_bound=0)
flags.DEFINE_float('learning_rate', 1e-3, 'Base learning rate (the papers: 1e-3; fine-tuning '
                   '2e-5).', lower_bound=0.)
flags.DEFINE_integer('warmup_steps', 0, 'Linear warm-up steps (DenseFlow: 5000); 0: none.',
                     lower_bound=0)
flags.DEFINE_float('lr_decay', 1.0, 'Learning rate factor per epoch: lr(t) = learning_rate * '
                   'min(1, (t+1)/warmup_steps) * lr_decay^floor(t/steps_per_epoch), t the '
                   '0-based step (DenseFlow: 0.95; CIFAR-10 0.9975).',
                   lower_bound=0., upper_bound=1.)
flags.DEFINE_enum('optimizer', 'adamax', ['adamax', 'adam'], 'Optimizer (Keras defaults for '
                  'betas and epsilon).')
flags.DEFINE_float('max_grad_norm', 0., 'Clip gradients to this global norm (LCMA: 100); 0: '
                   'off.', lower_bound=0.)
flags.DEFINE_float('scale_l2', 0., 'L2 penalty on weight-norm scales (RealNVP / LCMA: 5e-5).',
                   lower_bound=0.)
flags.DEFINE_enum('on_nonfinite', 'stop', ['stop', 'skip'],
                  'A NaN or Inf loss or gradient: stop training with a message (the last '
                  'checkpoint stays the last good one), or skip that update and go on.')
flags.DEFINE_integer('max_nonfinite_skips', 10, 'With --on_nonfinite=skip: stop training '
                     '(exit status 1) when this many steps in a row had a non-finite loss or '
                     'gradient.', lower_bound=1)
flags.DEFINE_integer('bn_refresh_batches', 8, 'Before each per-epoch test evaluation, '
                     'recompute the running statistics of every batch-norm layer on this many '
                     'training batches with the current weights (trainable weights untouched); '
                     '0: off, evaluate with the running averages. Models without batch norm '
                     '(Glow, mAR-SCF) skip it.', lower_bound=0)
flags.DEFINE_bool('jit_compile', True, 'XLA-compile the train and test steps; under '
                  '--strategy=mirrored or multiworker, each replica\'s forward and backward '
                  'pass (the all-reduce and the optimizer update run outside XLA).')
flags.DEFINE_enum('strategy', 'default', ['default', 'mirrored', 'multiworker'],
                  'tf.distribute strategy: one device; MirroredStrategy over the local GPUs '
                  '(or the logical CPUs of --num_cpu_devices); MultiWorkerMirroredStrategy from '
                  'the TF_CONFIG environment variable.')
flags.DEFINE_integer('worker_timeout_seconds', 10, '--strategy=multiworker: a worker that '
                     'sends no heartbeat for this long is declared lost, and the others stop '
                     'with an error naming the last checkpoint instead of waiting for it.',
                     lower_bound=1)
flags.DEFINE_integer('num_cpu_devices', 0, 'Split the CPU into this many logical devices '
                     '(to try --strategy=mirrored without GPUs); 0: leave as is.', lower_bound=0)
flags.DEFINE_bool('mixed_precision', False, "Keras' mixed_float16 policy: the networks "
                  'compute in float16, the flow, log-dets, priors, loss and every variable in '
                  'float32 (the same as --conditioner_precision=float16; GPUs only, refused on a '
                  'CPU). No loss scaling.')
flags.DEFINE_string('init_from', '', 'Fine-tune: start from the model weights of this workdir '
                    '(its latest checkpoint; DIR/best for its best) or checkpoint prefix, with a '
                    'fresh optimizer and schedule at --learning_rate. Used only when --workdir '
                    'has no checkpoint yet, so rerunning resumes the fine-tune.')
flags.DEFINE_integer('checkpoint_every_steps', 500, 'Save a checkpoint every this many steps '
                     '(and at every epoch end); 0: epoch ends only.', lower_bound=0)
flags.DEFINE_integer('keep_checkpoints', 3, 'Keep the last this many periodic checkpoints '
                     '(the best by test bits/dim is kept apart).', lower_bound=1)
flags.DEFINE_integer('log_every_steps', 50, 'TensorBoard training scalars every this many '
                     'steps.', lower_bound=1)

# ----------------------------------------------------------------- evaluation and sampling
flags.DEFINE_integer('eval_batch_size', 0, 'Batch size of the per-epoch test bits/dim, eval '
                     'and interpolation; 0: batch_size.', lower_bound=0)
flags.DEFINE_integer('eval_batches', 0, 'Test batches for the per-epoch test bits/dim and '
                     '--mode=eval; 0: the whole test split.', lower_bound=0)
flags.DEFINE_integer('num_importance_samples', 16, 'k of the importance-weighted bits/dim '
                     'estimate in --mode=eval (DenseFlow: 1000 on CIFAR-10, 200 elsewhere); it '
                     'costs k forward passes an image.', lower_bound=1)
flags.DEFINE_integer('num_samples', 64, 'Images in each sample grid (TensorBoard and '
                     '--mode=sample).', lower_bound=1)
flags.DEFINE_list('temperatures', ['1.0', '0.8'], 'Sampling temperatures: one grid each (the '
                  'DenseFlow figures use 0.8).')
flags.DEFINE_string('interpolation', 'linear', 'Interpolation in latent space for '
                    '--mode=interpolate: linear, or mar (mAR-SCF: the path optimised to stay in '
                    'high-density regions of the prior; see tfflows/interpolation.py), or one '
                    'registered in train/modes.py INTERPOLATIONS.')
flags.DEFINE_integer('interpolation_steps', 8, 'Images per interpolation path, end points '
                     'included.', lower_bound=2)
flags.DEFINE_integer('interpolation_pairs', 8, 'Pairs of test images to interpolate between.',
                     lower_bound=1)
flags.DEFINE_integer('memorization_queries', 8, 'Samples whose nearest training images '
                     '--mode=memorization shows.', lower_bound=1)
flags.DEFINE_integer('memorization_crop', 42, 'Side of the central crop compared by L2 '
                     '(DenseFlow appendix E: 42 on 64x64 faces); capped at the image size.',
                     lower_bound=1)
flags.DEFINE_integer('memorization_neighbours', 5, 'Nearest training images shown per sample.',
                     lower_bound=1)

# ----------------------------------------------------------------------------------- export
flags.DEFINE_string('export_dir', '', 'SavedModel base directory; the model goes to '
                    'EXPORT_DIR/<checkpoint step> (TF Serving version directories). Default: '
                    'WORKDIR/export.')
flags.DEFINE_integer('export_importance_samples', 1, 'k of the served log_prob (1: the one-'
                     'sample bound).', lower_bound=1)

# ----------------------------------------------------------------------- out-of-distribution
flags.DEFINE_integer('typicality_batch_size', 10, 'M of the typicality test (tfflows.ood): the '
                     'batch size whose mean bits/dim is compared with the training set\'s; '
                     'stored with the export (assets/typicality.json).', lower_bound=1)
flags.DEFINE_float('typicality_alpha', 0.99, 'Quantile of the held-out batch distances that '
                   'sets the typicality threshold epsilon.', lower_bound=0., upper_bound=1.)
flags.DEFINE_integer('typicality_bootstrap', 1000, 'Held-out batches of M drawn to set '
                     'epsilon (and, in --mode=ood, to measure the test\'s rates).',
                     lower_bound=1)
flags.DEFINE_integer('typicality_train_images', 10000, 'Training images (the first, in the '
                     'split\'s fixed order) whose mean bits/dim is the typicality test\'s H_hat.',
                     lower_bound=1)

# ------------------------------------------------------------------------------ model flags
MODEL_HELP = {
    'model': 'Architecture: glow, realnvp, denseflow, marscf.',
    'image_shape': 'H,W,C of the images; empty: the dataset\'s shape (must match it).',
    'num_levels': 'Glow / mAR-SCF: levels of squeeze, K steps, split.',
    'steps_per_level': 'Glow / mAR-SCF: flow steps K per level.',
    'width': 'Glow / mAR-SCF: channels of the coupling networks.',
    'coupling': 'Coupling layer: affine, or mixlogcdf (mAR-SCF / Flow++).',
    'scale_fn': 'Affine coupling scale: sigmoid (Glow), exp_tanh (DenseFlow), tanh (RealNVP).',
    'conv1x1': 'Invertible 1x1 convolution: lu or plain.',
    'split_prior': 'Prior of factored-out latents: learned (Glow\'s conv prior) or standard.',
    'num_scales': 'RealNVP / LCMA: scales.',
    'res_blocks': 'RealNVP / LCMA: residual blocks per coupling network.',
    'base_width': 'RealNVP / LCMA: coupling network width at the first scale.',
    'logit_alpha': 'RealNVP / LCMA: alpha of the logit preprocessing.',
    'split': 'Factoring out at the splits (RealNVP, Glow): static, random, lcma, lcma_reverse, '
             'or none (LCMA phase 1: no factoring out).',
    'lcma_masks': 'LCMA: the permutation file written by the LCMA analysis.',
    'block_conf': 'DenseFlow: units per dense block.',
    'layers_conf': 'DenseFlow: flow steps per unit in each block.',
    'layer_mid_channels': 'DenseFlow: coupling-network width in each block.',
    'growth_rate': 'DenseFlow: noise channels added by each cross-unit coupling.',
    'dense_layers': 'DenseFlow: layers of each coupling network\'s dense block.',
    'dense_growth': 'DenseFlow: channels each dense-block layer adds.',
    'num_landmarks': 'DenseFlow: Nystrom attention landmarks.',
    'pinv_iterations': 'DenseFlow: Nystrom pseudo-inverse iterations.',
    'attention': 'DenseFlow: attention form of the coupling networks: official (what the '
                 'authors\' code computes, the paper\'s numbers) or published (Nystrom '
                 'attention over pixel positions). docs/official_comparison.md.',
    'dequantization': 'Dequantization: uniform or variational.',
    'mar_hidden': 'mAR-SCF: ConvLSTM hidden channels of the prior.',
    'mar_layers': 'mAR-SCF: ConvLSTM layers of the prior.',
    'num_components': 'MixLogCDF: logistic mixture components.',
    'dropout': 'MixLogCDF conditioner dropout.',
    'attention_heads': 'MixLogCDF conditioner attention heads.',
}

TRAINING_FLAGS = frozenset(FLAGS)  # every flag defined above (absl's own ones included)


def _field_comments():
  """{field name: its trailing comment} read from the FlowConfig source, '' where none."""
  comments = {}
  try:
    source = inspect.getsource(FlowConfig)
  except (OSError, TypeError):
    return comments
  line_field = {}
  for i, line in enumerate(source.splitlines(), start=1):
    name = line.strip().split(':', 1)[0]
    if name.isidentifier():
      line_field[i] = name
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT and token.start[0] in line_field:
      comments[line_field[token.start[0]]] = token.string.lstrip('# ').strip()
  return comments


def model_flag_name(field_name):
  """The flag of a FlowConfig field: its own name, or model_<name> if a training flag has it."""
  return f'model_{field_name}' if field_name in TRAINING_FLAGS else field_name


def _define_model_flags():
  comments = _field_comments()
  for field in dataclasses.fields(FlowConfig):
    name = model_flag_name(field.name)
    default = field.default
    text = (MODEL_HELP.get(field.name) or field.metadata.get('help')
            or comments.get(field.name) or f'FlowConfig.{field.name}.')
    if field.name == 'image_shape':
      flags.DEFINE_list(name, [], text)
    elif isinstance(default, bool):
      flags.DEFINE_bool(name, default, text)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, text)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, text)
    elif isinstance(default, tuple):
      flags.DEFINE_list(name, [str(v) for v in default], text + ' Comma list.')
      flags.register_validator(name, _int_list, f'--{name} must be a comma list of integers.')
    else:
      flags.DEFINE_string(name, '' if default is None else str(default), text)


def _int_list(values):
  try:
    [int(v) for v in values]  # pylint: disable=expression-not-assigned
  except (TypeError, ValueError):
    return False
  return True


_define_model_flags()


def _define_retired_flags():
  """The flags of retired FlowConfig fields (``tfflows.config.RETIRED_FIELDS``), accepted and
  ignored so that a flags.txt written by an earlier version reruns; defined outside this
  module's flags, so --help, ``program_flags`` and new flags.txt files leave them out."""
  for name in RETIRED_FIELDS:
    flags.DEFINE_bool(name, None, f'Retired and ignored ({name}: every group of repeated steps '
                      'runs as one loop).', module_name='train.retired_flags')


_define_retired_flags()
flags.register_validator('image_shape', lambda v: not v or (len(v) == 3 and _int_list(v)),
                         '--image_shape must be empty (the dataset\'s) or three integers H,W,C.')
flags.register_validator('typicality_alpha', lambda v: 0. < v < 1.,
                         '--typicality_alpha must lie strictly between 0 and 1.')
flags.register_validator('temperatures', lambda v: _float_list(v, minimum=0.),
                         '--temperatures must be a non-empty comma list of numbers >= 0.')


def _float_list(values, minimum):
  try:
    numbers = [float(v) for v in values]
  except (TypeError, ValueError):
    return False
  return bool(numbers) and min(numbers) >= minimum


def model_field_values(flag_values=FLAGS):
  """{FlowConfig field: value} from the model flags (image_shape may be () for 'dataset's')."""
  values = {}
  for field in dataclasses.fields(FlowConfig):
    value = flag_values[model_flag_name(field.name)].value
    if isinstance(field.default, tuple) or field.name == 'image_shape':
      value = tuple(int(v) for v in value or ())
    values[field.name] = value
  return values


# ------------------------------------------------------------------------- groups and help
GROUPS = (
    ('Run', ('mode', 'workdir', 'checkpoint', 'verbose', 'seed', 'deterministic')),
    ('Data', ('dataset', 'data_dir', 'flip', 'translate_pixels')),
    ('Model (the fields of tfflows.FlowConfig)',
     tuple(model_flag_name(f.name) for f in dataclasses.fields(FlowConfig))),
    ('Training', ('batch_size', 'epochs', 'steps_per_epoch', 'learning_rate', 'warmup_steps',
                  'lr_decay', 'optimizer', 'max_grad_norm', 'scale_l2', 'on_nonfinite',
                  'max_nonfinite_skips', 'bn_refresh_batches', 'jit_compile', 'strategy',
                  'num_cpu_devices', 'worker_timeout_seconds',
                  'mixed_precision', 'init_from', 'checkpoint_every_steps', 'keep_checkpoints',
                  'log_every_steps')),
    ('Evaluation and sampling', ('eval_batch_size', 'eval_batches', 'num_importance_samples',
                                 'num_samples', 'temperatures', 'interpolation',
                                 'interpolation_steps', 'interpolation_pairs',
                                 'memorization_queries', 'memorization_crop',
                                 'memorization_neighbours')),
    ('Export', ('export_dir', 'export_importance_samples')),
    ('Out-of-distribution (--mode=ood and the export\'s typicality statistics)',
     ('typicality_batch_size', 'typicality_alpha', 'typicality_bootstrap',
      'typicality_train_images')),
)
MODULE = __name__  # the module whose flags are the program's


def program_flags(flag_values=FLAGS):
  """The program's own flags (this module's), in definition order: no absl, TF or TFDS flag."""
  return list(flag_values.get_flags_for_module(MODULE))


def _flag_lines(flag, width=100):
  """'  --name=DEFAULT' (or '  --[no]name  (default: true)') and the wrapped help under it."""
  if isinstance(flag, flags.BooleanFlag):
    head = f'  --[no]{flag.name}  (default: {"true" if flag.default else "false"})'
  else:
    default = flag.default_as_str.strip("'") if flag.default_as_str else ''
    head = f'  --{flag.name}={default}'
  body = textwrap.fill(flag.help, width=width, initial_indent=' ' * 6,
                       subsequent_indent=' ' * 6)
  return [head, body]


def help_text(usage='', full=False, flag_values=FLAGS):
  """--help: `usage`, then the program's flags by group. full: then every library flag."""
  lines = [usage.strip(), ''] if usage else []
  by_name = {flag.name: flag for flag in program_flags(flag_values)}
  grouped = {name for _, names in GROUPS for name in names}
  others = tuple(name for name in by_name if name not in grouped)  # a flag new to GROUPS
  for title, names in GROUPS + ((('Other', others),) if others else ()):
    lines.append(f'{title}:')
    for name in names:
      lines.extend(_flag_lines(by_name[name]))
    lines.append('')
  lines.append('  --flagfile=FILE  read flags from FILE, one --flag=value a line (# comments); '
               'later flags override it.')
  if full:
    lines += ['', 'Flags of the libraries (absl, TensorFlow, TFDS):', '']
    for module in sorted(flag_values.flags_by_module_dict()):
      if module not in (MODULE, '__main__'):
        lines.append(flag_values.module_help(module))
  else:
    lines.append('  --helpfull  also lists the flags of the libraries (absl, TensorFlow).')
  return '\n'.join(lines) + '\n'


HELP_ARGS = {'--help': False, '-help': False, '-h': False, '-?': False, '--helpshort': False,
             '-helpshort': False, '--helpfull': True, '-helpfull': True}


def help_request(argv):
  """None, or whether the command line asks for the full help (--helpfull) or the short one
  (--help, -h, -?, --helpshort)."""
  asked = [HELP_ARGS[a] for a in argv[1:] if a in HELP_ARGS]
  return any(asked) if asked else None


PATH_FLAGS = ('workdir', 'data_dir', 'init_from', 'export_dir')  # written as absolute paths


def flagfile_text(flag_values=FLAGS, header=''):
  """The program's flags as a flagfile that reproduces the run from any directory: every
  program flag, default or not, one --flag=value a line (absl and TensorFlow flags left out),
  the directories of PATH_FLAGS made absolute."""
  lines = [f'# {line}' if line else '#' for line in header.splitlines()]
  for flag in program_flags(flag_values):
    if flag.name in PATH_FLAGS and flag.value:
      lines.append(f'--{flag.name}={os.path.abspath(flag.value)}')
      continue
    text = flag.serialize()
    if text:  # a string flag whose value is None (--data_dir unset) serializes to ''
      lines.append(text)
  return '\n'.join(lines) + '\n'
