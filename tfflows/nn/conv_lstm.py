"""A stack of convolutional LSTM cells with a teacher-forced mode and a step-by-step mode.

One cell (Shi et al. 2015, without peepholes), per pixel and with * a 'same' convolution:

    [i, f, g, o] = W_x * x_t + b_x + W_h * h_(t-1) + b_h
    c_t = sigmoid(f) c_(t-1) + sigmoid(i) tanh(g)
    h_t = sigmoid(o) tanh(c_t)

Both convolutions have a k x k kernel with the given dilation (``dilated_conv2d``: forward and
gradient on every CPU kernel set and under XLA). As in PyTorch's LSTM, and in the ConvLSTM of
the official mAR-SCF code (``mar_prior/convolutional_rnn``), each convolution has its own bias
(b_x and b_h: two weights whose sum is the gate bias, so under Adam-type optimisers the gate
bias moves twice as fast as one bias would) and every weight starts ~ U(-1/sqrt(h), 1/sqrt(h)),
h the hidden channels.
Layer l of the stack reads the hidden states h of layer l-1 (layer 1 reads x); the
stack outputs the hidden states of the top layer.

Two modes with the same weights and the same arithmetic:
  * ``call(seq)``: teacher-forced over a whole sequence [B, T, H, W, Cin] ->
    [B, T, H, W, hidden]. The input convolution W_x * x_t of each layer runs for all T at once
    (T folded into the batch); only the recurrent part is sequential (a ``tf.scan``, which
    compiles under XLA).
  * ``step(x_t, state)``: one time step through all layers, for sampling;
    ``initial_state(batch, H, W)`` gives the zero state.

keras.layers.ConvLSTM2D also works here under XLA (checked with dilation 2 and an unknown
batch), but Keras 3 exports no ConvLSTM cell, so it has no public step API with explicit state;
this module therefore implements the cell itself.
"""

import keras
import tensorflow as tf


class ConvLSTMCell(keras.layers.Layer):
  """One ConvLSTM cell; the weights are W_x [k, k, Cin, 4h], W_h [k, k, h, 4h], b_x and
  b_h [4h]."""

  def __init__(self, hidden, kernel_size=5, dilation=1, **kwargs):
    super().__init__(**kwargs)
    self.hidden = hidden
    self.kernel_size = kernel_size
    self.dilation = dilation

  def get_config(self):
    return {**super().get_config(), 'hidden': self.hidden, 'kernel_size': self.kernel_size,
            'dilation': self.dilation}

  def build(self, input_shape):
    k, h = self.kernel_size, self.hidden
    bound = 1. / h ** 0.5

    def weight(shape, name):
      return self.add_weight(shape=shape, name=name,
                             initializer=keras.initializers.RandomUniform(-bound, bound))

    self.input_kernel = weight((k, k, input_shape[-1], 4 * h), 'input_kernel')
    self.recurrent_kernel = weight((k, k, h, 4 * h), 'recurrent_kernel')
    self.input_bias = weight((4 * h,), 'input_bias')
    self.recurrent_bias = weight((4 * h,), 'recurrent_bias')

  def _conv(self, x, kernel):
    return dilated_conv2d(x, tf.cast(kernel, x.dtype), self.dilation)

  def input_gates(self, x):
    """W_x * x + b_x for x [N, H, W, Cin] -> [N, H, W, 4h]."""
    return self._conv(x, self.input_kernel) + tf.cast(self.input_bias, x.dtype)

  def recur(self, x_gates, state):
    """One recurrence given the precomputed input gates; state = (h, c) -> (h', (h', c'))."""
    h, c = state
    gates = x_gates + self._conv(h, self.recurrent_kernel) + tf.cast(self.recurrent_bias,
                                                                    x_gates.dtype)
    i, f, g, o = tf.split(gates, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    h = tf.sigmoid(o) * tf.tanh(c)
    return h, (h, c)

  def call(self, x, state):
    return self.recur(self.input_gates(x), state)


def dilated_conv2d(x, kernel, dilation):
  """The 'same' convolution of x [N, H, W, Cin] with kernel [k, k, Cin, Cout] (the layout of
  tf.nn.conv2d) at stride 1 and the given dilation r >= 1 -> [N, H, W, Cout]:

      y[n, p, q, :] = sum_(i, j) x[n, p + r i - a, q + r j - a, :] kernel[i, j],
      a = r (k - 1) // 2

  with zeros outside the image (the padding of tf.nn.conv2d's 'SAME' for the dilated kernel's
  extent r (k - 1) + 1; a = r (k - 1) / 2 for odd k). H and W need not be multiples of r.
  Raises ValueError for r < 1.

  Why not ``tf.nn.conv2d(..., dilations=r)``: TensorFlow's plain CPU kernels (those it runs
  with ``TF_ENABLE_ONEDNN_OPTS=0``, its default on Linux CPUs without AVX512-VNNI,
  AVX512-BF16, AVX-VNNI or AMX, e.g. AVX2-only ones) have no gradient for r > 1 ("Current CPU
  implementations do not yet support dilation rates larger than 1"), and neither has oneDNN
  for float64, so mAR-SCF could not train there. For r > 1, ``tf.nn.convolution`` (off TPU)
  computes the same function as an ordinary convolution between space_to_batch and
  batch_to_space (the input is split into r x r interleaved sub-images, each convolved with
  the undilated kernel: the algorithme a trous as used in DeepLab, Chen et al., TPAMI 2017,
  sec. 3.1), whose forward and gradient exist on every CPU kernel set, on GPU and under XLA.
  For r = 1 it is tf.nn.conv2d. With oneDNN on, a training step of
  configs/marscf_affine_mnist.flags ran at the speed of the native dilated kernel's within the
  noise of a shared 2-core machine (195-238 against 218-223 images/s).
  """
  if dilation < 1:
    raise ValueError(f'dilation must be >= 1, got {dilation}')
  return tf.nn.convolution(x, kernel, strides=1, padding='SAME', dilations=dilation)


class ConvLSTMStack(keras.layers.Layer):
  """num_layers ConvLSTM cells stacked; outputs the top layer's hidden states."""

  def __init__(self, hidden=32, num_layers=3, kernel_size=5, dilation=1, **kwargs):
    super().__init__(**kwargs)
    self.hidden = hidden
    self.num_layers = num_layers
    self.kernel_size = kernel_size
    self.dilation = dilation
    self.cells = [ConvLSTMCell(hidden, kernel_size, dilation, name=f'cell_{i}')
                  for i in range(num_layers)]

  def get_config(self):
    return {**super().get_config(), 'hidden': self.hidden, 'num_layers': self.num_layers,
            'kernel_size': self.kernel_size, 'dilation': self.dilation}

  def build(self, input_shape):
    """input_shape: [B, T, H, W, Cin] (a sequence) or [B, H, W, Cin] (one step)."""
    in_channels = input_shape[-1]
    for cell in self.cells:
      cell.build((None, None, None, in_channels))
      in_channels = self.hidden

  def initial_state(self, batch, height, width):
    """Zero state: a tuple over layers of (h, c), each [batch, H, W, hidden]."""
    zeros = tf.zeros([batch, height, width, self.hidden], self.compute_dtype)
    return tuple((zeros, zeros) for _ in self.cells)

  def step(self, x_t, state):
    """One time step: x_t [B, H, W, Cin], state from initial_state -> (out_t, new state)."""
    if not self.built:
      self.build(x_t.shape)
    new_state = []
    for cell, s in zip(self.cells, state):
      x_t, s = cell(x_t, s)
      new_state.append(s)
    return x_t, tuple(new_state)

  def call(self, seq):
    """Teacher-forced pass: seq [B, T, H, W, Cin] -> [B, T, H, W, hidden]."""
    for cell in self.cells:
      seq = _run_layer(cell, seq)
    return seq


def _run_layer(cell, seq):
  """One layer over a sequence: parallel input convolution, then a scan over time."""
  t, height, width, channels = seq.shape[1:]
  gates = cell.input_gates(tf.reshape(seq, [-1, height, width, channels]))
  gates = tf.reshape(gates, [-1, t, height, width, 4 * cell.hidden])
  gates = tf.transpose(gates, [1, 0, 2, 3, 4])  # time-major
  zeros = tf.zeros_like(gates[0, ..., :cell.hidden])
  hs, _ = tf.scan(lambda carry, g: _scan_step(cell, carry, g), gates,
                  initializer=(zeros, zeros))
  return tf.transpose(hs, [1, 0, 2, 3, 4])


def _scan_step(cell, carry, gates_t):
  """tf.scan body: carry = (h, c) -> (h', c')."""
  _, state = cell.recur(gates_t, carry)
  return state
