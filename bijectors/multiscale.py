"""Multi-scale splitting: a multipart bijector from an image to a structure of latents.

A multi-scale flow is a list of levels. Level i maps its input to h_i with a bijector T_i (which
usually starts with a squeeze); at every level but the last, h_i splits along channels into the
half that goes on, r_i = h_i[..., :k_i], and the half that is factored out, z_i = h_i[..., k_i:]:

    h_1 = T_1(x),          (r_1, z_1) = split(h_1)
    h_2 = T_2(r_1),        (r_2, z_2) = split(h_2)
    ...
    z_L = h_L = T_L(r_{L-1})

    log|det d(z_1..z_L)/dx| = sum_i log|det dT_i|        (splits are permutations: log-det 0)

The latents are ordered top-down, [z_L, z_{L-1}, ..., z_1]: the order in which sampling draws
them, and the order of the factors of the prior (``tfflows.distributions.joint``). The context of
the prior of z_i is r_i, the half that went on; ``encode`` returns these contexts so that the
training path evaluates the prior without inverting the flow.

Augmented levels (DenseFlow's cross-unit coupling) consume noise tensors e ~ p*(e) in their
forward map; the bijector's forward input is then the flat list [x, e_1, ..., e_m], and its
inverse recovers them exactly (generation simply ignores the recovered noise).

Shapes. ``encode`` / ``decode`` / ``decode_level`` take tensors with one batch axis
([B, H, W, C]: the training and sampling paths); the TFP methods and ``forward_and_log_det`` /
``inverse_and_log_det`` take any number of leading axes (``bijectors.base``), and the event
shape methods keep the leading axes of their argument. A wrong image shape, a wrong number of
latents or noise tensors, or a latent of the wrong shape raises ValueError naming what is
expected.
"""

import dataclasses

import tensorflow as tf

from bijectors import base


@dataclasses.dataclass
class Level:
  """One level: ``transform`` maps the level's input to h; ``keep_channels`` of h go on (None
  at the last level). An augmented ``transform`` (with ``noise_shapes``) consumes its slice of
  the flat noise list (``base.forward_consuming``)."""

  transform: base.FlowBijector
  keep_channels: int = None

  @property
  def noise_shapes(self):
    return base.noise_shapes(self.transform)


class MultiScaleFlow(base.FlowBijector):
  """Image [B, H, W, C] (plus augmentation noise) -> latents [z_L, ..., z_1] (top-down)."""

  def __init__(self, levels, image_shape, name='multi_scale_flow'):
    self.levels = list(levels)
    self.image_shape = tuple(image_shape)
    if self.levels[-1].keep_channels is not None:
      raise ValueError('The last level keeps everything: its keep_channels must be None.')
    self.noise_shapes = [tuple(s) for level in self.levels for s in level.noise_shapes]
    self.level_shapes, self.latent_shapes = self._static_shapes()
    layers = [l for level in self.levels for l in level.transform.layers]
    input_ndims = [3] * (1 + len(self.noise_shapes)) if self.noise_shapes else 3
    super().__init__(name=name, layers=layers, forward_min_event_ndims=input_ndims,
                     inverse_min_event_ndims=[3] * len(self.levels))

  @property
  def is_augmented(self):
    return bool(self.noise_shapes)

  def _static_shapes(self):
    """Shapes of each level's output h_i and of the latents (top-down)."""
    shape = tf.TensorShape(self.image_shape)
    level_shapes, latents = [], []
    for level in self.levels:
      shape = tf.TensorShape(level.transform.forward_event_shape(shape))
      level_shapes.append(tuple(shape.as_list()))
      if level.keep_channels is None:
        latents.append(tuple(shape.as_list()))
      else:
        h, w, c = shape.as_list()
        if not 0 < level.keep_channels < c:
          raise ValueError(f'keep_channels={level.keep_channels} must lie in (0, {c}).')
        latents.append((h, w, c - level.keep_channels))
        shape = tf.TensorShape([h, w, level.keep_channels])
    return level_shapes, latents[::-1]

  # -- checks -----------------------------------------------------------------------------------
  def describe_latents(self):
    """'N latents, top-down [z_L, ..., z_1], event shapes [...]' for error messages."""
    shapes = ', '.join(str(list(s)) for s in self.latent_shapes)
    return (f'{len(self.latent_shapes)} latent{"s" if len(self.latent_shapes) > 1 else ""}, '
            f'ordered top-down [z_L, ..., z_1] as encode returns them, with event shapes '
            f'{shapes} (after the same leading axes)')

  def check_latents(self, latents):
    """Returns latents as a list, or raises ValueError naming the count, order and shapes."""
    if isinstance(latents, (tf.Tensor, tf.Variable)) or hasattr(latents, '__array__'):
      raise ValueError(f'{self.name}: expected a list of {self.describe_latents()}; got one '
                       f'tensor of shape {latents.shape}.')
    latents = [tf.convert_to_tensor(z) for z in latents]
    if len(latents) != len(self.latent_shapes):
      raise ValueError(f'{self.name}: expected {self.describe_latents()}; got {len(latents)} '
                       f'latent{"s" if len(latents) != 1 else ""} with shapes '
                       f'{[z.shape.as_list() for z in latents]}.')
    for k, (z, shape) in enumerate(zip(latents, self.latent_shapes)):
      if z.shape.rank is None or z.shape.rank < 3 or not z.shape[-3:].is_compatible_with(shape):
        raise ValueError(f'{self.name}: latent {k} (top-down) has shape {z.shape.as_list()}, '
                         f'expected [..., {", ".join(map(str, shape))}]; the flow takes '
                         f'{self.describe_latents()}.')
    return latents

  def check_image(self, x):
    """Raises ValueError unless x has the event shape [..., H, W, C] of the image."""
    if x.shape.rank is None or x.shape.rank < 3 or not x.shape[-3:].is_compatible_with(
        self.image_shape):
      raise ValueError(f'{self.name}: expected images of event shape '
                       f'[..., {", ".join(map(str, self.image_shape))}], got shape {x.shape}.')

  def _check_noise(self, noise):
    noise = list(noise)
    if len(noise) != len(self.noise_shapes):
      raise ValueError(f'{self.name}: expected {len(self.noise_shapes)} noise tensors of shapes '
                       f'{[list(s) for s in self.noise_shapes]}, got {len(noise)}.')
    for k, (e, shape) in enumerate(zip(noise, self.noise_shapes)):
      e_shape = tf.TensorShape(getattr(e, 'shape', None))
      if e_shape.rank is None or e_shape.rank < 3 or not e_shape[-3:].is_compatible_with(shape):
        raise ValueError(f'{self.name}: noise tensor {k} has shape {e_shape}, expected '
                         f'[..., {", ".join(map(str, shape))}].')
    return noise

  # -- the training path ---------------------------------------------------------------------
  def encode(self, x, noise=()):
    """x [B, H, W, C] -> (latents top-down, contexts top-down, log-det [B]).

    ``noise`` is the flat list of augmentation noise tensors (``self.noise_shapes``).
    contexts[i] is the kept half r the prior of latents[i] is conditioned on (None on top).
    """
    x = tf.convert_to_tensor(x)
    self.check_image(x)
    noise = self._check_noise(noise)
    latents, contexts, total = [], [], 0.
    h = x
    for level in self.levels:
      h, ldj, noise = base.forward_consuming(level.transform, h, noise)
      total = total + ldj
      if level.keep_channels is None:
        latents.append(h)
        contexts.append(None)
      else:
        kept, factored = h[..., :level.keep_channels], h[..., level.keep_channels:]
        latents.append(factored)
        contexts.append(kept)
        h = kept
    return latents[::-1], contexts[::-1], total

  def decode_level(self, index, h):
    """Inverts level ``index`` (bottom-up numbering) from its full output h: (input, ildj)
    (augmentation noise it recovers is dropped, as generation does)."""
    x, _, ildj = base.inverse_recovering(self.levels[index].transform, h)
    return x, ildj

  def decode(self, latents):
    """latents top-down (each [B, h, w, c]) -> (x, ildj)."""
    x, _, ildj = self.decode_with_noise(latents)
    return x, ildj

  def decode_with_noise(self, latents):
    """latents top-down (each [B, h, w, c]) -> (x, the flat noise list the forward map
    consumed, ildj): the exact inverse of ``encode``."""
    latents = self.check_latents(latents)
    h, total, noise = latents[0], 0., []
    for k, index in enumerate(reversed(range(len(self.levels)))):
      if k > 0:
        h = tf.concat([h, latents[k]], axis=-1)
      h, level_noise, ildj = base.inverse_recovering(self.levels[index].transform, h)
      noise = list(level_noise) + noise
      total = total + ildj
    return h, noise, total

  # -- the TFP bijector ----------------------------------------------------------------------
  # The public TFP methods check the structure first (TFP's own message would name nest
  # structures, not latents).
  def forward(self, x, name='forward', **kwargs):
    return super().forward(self._check_input_structure(x), name=name, **kwargs)

  def inverse(self, y, name='inverse', **kwargs):
    return super().inverse(self.check_latents(y), name=name, **kwargs)

  def forward_log_det_jacobian(self, x, event_ndims=None, name='forward_log_det_jacobian',
                               **kwargs):
    return super().forward_log_det_jacobian(self._check_input_structure(x), event_ndims,
                                            name=name, **kwargs)

  def inverse_log_det_jacobian(self, y, event_ndims=None, name='inverse_log_det_jacobian',
                               **kwargs):
    return super().inverse_log_det_jacobian(self.check_latents(y), event_ndims, name=name,
                                            **kwargs)

  def forward_and_log_det(self, x, **condition):
    return super().forward_and_log_det(self._check_input_structure(x), **condition)

  def inverse_and_log_det(self, y, **condition):
    return super().inverse_and_log_det(self.check_latents(y), **condition)

  def _check_input_structure(self, x):
    """The image (plain flows) or the list [image, e_1, ..., e_m] (augmented flows)."""
    if not self.is_augmented:
      if isinstance(x, (list, tuple)):
        raise ValueError(f'{self.name}: expected one image tensor [..., '
                         f'{", ".join(map(str, self.image_shape))}], got a list of {len(x)}.')
      x = tf.convert_to_tensor(x)
      self.check_image(x)
      return x
    expected = [list(self.image_shape)] + [list(s) for s in self.noise_shapes]
    if not isinstance(x, (list, tuple)) or len(x) != len(expected):
      got = (f'a list of {len(x)}' if isinstance(x, (list, tuple))
             else f'one tensor of shape {getattr(x, "shape", None)}')
      raise ValueError(f'{self.name}: expected the list [image, e_1, ..., e_m] of '
                       f'{len(expected)} tensors with event shapes {expected} (the image and '
                       f'its augmentation noise), got {got}.')
    x = [tf.convert_to_tensor(t) for t in x]
    self.check_image(x[0])
    self._check_noise(x[1:])
    return x

  def _split_input(self, x):
    if self.is_augmented:
      x = list(x)
      return x[0], x[1:]
    return x, ()

  def _forward_and_log_det(self, x, **unused):
    image, noise = self._split_input(x)
    latents, _, ldj = self.encode(image, noise)
    return latents, ldj

  def _inverse_and_log_det(self, y, **unused):
    image, noise, ildj = self.decode_with_noise(y)
    return ([image] + list(noise) if self.is_augmented else image), ildj

  def _forward_dtype(self, input_dtype, **unused):
    return [tf.nest.flatten(input_dtype)[0]] * len(self.levels)

  def _inverse_dtype(self, output_dtype, **unused):
    dtype = tf.nest.flatten(output_dtype)[0]
    return [dtype] * (1 + len(self.noise_shapes)) if self.is_augmented else dtype

  # Shapes keep the leading axes of their argument; its event parts must be the flow's.
  def _input_events(self):
    return [self.image_shape] + list(self.noise_shapes) if self.is_augmented else [
        self.image_shape]

  def _forward_event_shape(self, input_shape):
    leading = _static_leading(tf.nest.flatten(input_shape), self._input_events(),
                              f'{self.name}: forward_event_shape input')
    return [leading.concatenate(s) for s in self.latent_shapes]

  def _inverse_event_shape(self, output_shape):
    leading = _static_leading(tf.nest.flatten(output_shape), self.latent_shapes,
                              f'{self.name}: inverse_event_shape of latents (top-down)')
    shapes = [leading.concatenate(s) for s in self._input_events()]
    return shapes if self.is_augmented else shapes[0]

  def _forward_event_shape_tensor(self, input_shape):
    leading = _dynamic_leading(tf.nest.flatten(input_shape), self._input_events(),
                               f'{self.name}: forward_event_shape_tensor input')
    return [tf.concat([leading, tf.constant(s, leading.dtype)], 0) for s in self.latent_shapes]

  def _inverse_event_shape_tensor(self, output_shape):
    leading = _dynamic_leading(tf.nest.flatten(output_shape), self.latent_shapes,
                               f'{self.name}: inverse_event_shape_tensor of latents (top-down)')
    shapes = [tf.concat([leading, tf.constant(s, leading.dtype)], 0)
              for s in self._input_events()]
    return shapes if self.is_augmented else shapes[0]


def _static_leading(shapes, events, what):
  """The common leading axes of ``shapes`` (TensorShapes) whose last three axes must be
  ``events``; raises ValueError naming the mismatch."""
  shapes = [tf.TensorShape(s) for s in shapes]
  if len(shapes) != len(events):
    raise ValueError(f'{what}: expected {len(events)} shapes ending in '
                     f'{[list(e) for e in events]}, got {len(shapes)}: '
                     f'{[s.as_list() if s.rank is not None else None for s in shapes]}.')
  leading = None
  for s, event in zip(shapes, events):
    if s.rank is None:
      return tf.TensorShape(None)
    if s.rank < 3 or not s[-3:].is_compatible_with(event):
      raise ValueError(f'{what}: shape {s.as_list()} does not end in the event shape '
                       f'{list(event)}.')
    leading = s[:-3] if leading is None else leading.merge_with(s[:-3])
  return leading


def _dynamic_leading(shapes, events, what):
  """``_static_leading`` for shape tensors (checked where their values are static)."""
  shapes = [tf.convert_to_tensor(s, tf.int32) for s in shapes]
  if len(shapes) != len(events):
    raise ValueError(f'{what}: expected {len(events)} shapes, got {len(shapes)}.')
  for s, event in zip(shapes, events):
    value = tf.get_static_value(s)
    if value is not None and (len(value) < 3 or list(value[-3:]) != list(event)):
      raise ValueError(f'{what}: shape {list(value)} does not end in the event shape '
                       f'{list(event)}.')
  return shapes[0][:-3]
