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
"""

import dataclasses

import tensorflow as tf

from bijectors import base


@dataclasses.dataclass
class Level:
  """One level: ``transform`` maps the level's input to h; ``keep_channels`` of h go on (None
  at the last level); ``noise_shapes`` lists the [H, W, C] shapes of the augmentation noise
  tensors that ``transform`` consumes (empty for an ordinary bijector)."""

  transform: base.FlowBijector
  keep_channels: int = None
  noise_shapes: tuple = ()


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

  # -- the training path ---------------------------------------------------------------------
  def encode(self, x, noise=()):
    """x -> (latents top-down, contexts top-down, log-det [B]).

    ``noise`` is the flat list of augmentation noise tensors (``self.noise_shapes``).
    contexts[i] is the kept half r the prior of latents[i] is conditioned on (None on top).
    """
    noise = list(noise)
    if len(noise) != len(self.noise_shapes):
      raise ValueError(f'Expected {len(self.noise_shapes)} noise tensors, got {len(noise)}.')
    latents, contexts, total = [], [], 0.
    h = x
    for level in self.levels:
      condition = {}
      if level.noise_shapes:
        condition['noise'] = noise[:len(level.noise_shapes)]
        noise = noise[len(level.noise_shapes):]
      h, ldj = level.transform.forward_and_log_det(h, **condition)
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

  def decode_level(self, index, h, with_noise=False):
    """Inverts level ``index`` (bottom-up numbering) from its full output h.

    Returns (input, ildj) or, with_noise, (input, noise list, ildj)."""
    transform = self.levels[index].transform
    if self.levels[index].noise_shapes:
      x, noise, ildj = transform.inverse_with_noise(h)
    else:
      (x, ildj), noise = transform.inverse_and_log_det(h), []
    return (x, noise, ildj) if with_noise else (x, ildj)

  def decode(self, latents, with_noise=False):
    """latents top-down -> (x, ildj) or, with_noise, (x, noise list, ildj)."""
    latents = list(latents)
    h, total, noise = latents[0], 0., []
    for k, index in enumerate(reversed(range(len(self.levels)))):
      if k > 0:
        h = tf.concat([h, latents[k]], axis=-1)
      h, level_noise, ildj = self.decode_level(index, h, with_noise=True)
      noise = list(level_noise) + noise
      total = total + ildj
    return (h, noise, total) if with_noise else (h, total)

  # -- the TFP bijector ----------------------------------------------------------------------
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
    image, noise, ildj = self.decode(y, with_noise=True)
    return ([image] + list(noise) if self.is_augmented else image), ildj

  def _forward_dtype(self, input_dtype, **unused):
    return [tf.nest.flatten(input_dtype)[0]] * len(self.levels)

  def _inverse_dtype(self, output_dtype, **unused):
    dtype = tf.nest.flatten(output_dtype)[0]
    return [dtype] * (1 + len(self.noise_shapes)) if self.is_augmented else dtype

  def _forward_event_shape(self, input_shape):
    return [tf.TensorShape(s) for s in self.latent_shapes]

  def _inverse_event_shape(self, output_shape):
    image = tf.TensorShape(self.image_shape)
    if self.is_augmented:
      return [image] + [tf.TensorShape(s) for s in self.noise_shapes]
    return image

  def _forward_event_shape_tensor(self, input_shape):
    return [tf.constant(s, tf.int32) for s in self.latent_shapes]

  def _inverse_event_shape_tensor(self, output_shape):
    image = tf.constant(self.image_shape, tf.int32)
    if self.is_augmented:
      return [image] + [tf.constant(s, tf.int32) for s in self.noise_shapes]
    return image
