"""Mixture-of-logistics CDF coupling (Flow++, Ho et al. 2019), as used by mAR-SCF.

The input x [B, H, W, C] is split along channels into x1 = x[..., :c1] (c1 = ceil(C/2),
passed through unchanged) and x2 = x[..., c1:] (c2 = floor(C/2) channels, transformed
element-wise). A conditioner network maps x1 to, per element of x2, the parameters
(a, t, pi_1..K, mu_1..K, log s_1..K) and

    F(x)  = sum_k pi_k sigmoid((x - mu_k) exp(-log s_k))        mixture-of-logistics CDF
    y2    = (logit F(x2) + t) * exp(a)

with pi = softmax(logits) over the K components and log s_k = max(log s_k_raw, -7).

The scale exponent is bounded softly, a = a_bound * tanh(a_raw / a_bound) (a_bound = 2 by
default), so |a| < a_bound, a ~ a_raw near zero, and the gradient never vanishes abruptly.

Log-determinant (exact, per element of x2, summed over the event):

    log dy2/dx2 = a + log f(x2) - log F(x2) - log(1 - F(x2))
    log f       = logsumexp_k [log pi_k + log sigmoid(z_k) + log sigmoid(-z_k) - log s_k]
    log F       = logsumexp_k [log pi_k + log sigmoid(z_k)]
    log(1 - F)  = logsumexp_k [log pi_k + log sigmoid(-z_k)],    z_k = (x - mu_k) exp(-log s_k)

so logit F = log F - log(1 - F) is computed in log space and stays finite in the tails.

Inverse: u = y2 exp(-a) - t is the target logit, and x2 is the root of the increasing function
g(x) = logit F(x) - u. Because F is a convex combination of the component CDFs, the root lies
in the exact bracket

    [min_k (mu_k + s_k u),  max_k (mu_k + s_k u)]

(at the lower end every component CDF is <= sigmoid(u), at the upper end every one is >=).
The root is found by TFP's Chandrupatla method (default; a bracketing, superlinearly convergent
method that compiles under XLA) or by plain bisection with a fixed iteration count.

Inverse tolerance: Chandrupatla stops when the bracket is narrower than
position_tolerance = 1e-6 (float32) / 1e-12 (float64) plus a few ulps of x, or after 100
iterations; bisection after `bisection_iterations` halvings (default 40 in float32, 64 in
float64), i.e. |x - x*| <= (hi - lo) 2^-(N+1) for the root x* of the computed equation.
The stated round-trip accuracy |inverse(forward(x)) - x| is 1e-5 in float32 and 1e-9 in
float64 for |x| <= 10 and conditioner outputs of order one (tests/test_mixlogcdf.py checks it;
measured: about 5e-6 in float32 and 1e-14 in float64 with either method). Beyond that the
problem itself is ill-conditioned: where logit F is flat (a component with a huge scale s
dominates the tail), the rounding error of u is amplified by s, whatever the root finder.

The inverse log-determinant is minus the forward one at the recovered x2.

Gradient of the inverse (implicit function theorem). The root search itself is not
differentiated (it runs under ``stop_gradient``); the root x* gets the derivatives of the
implicit function g(x; u, theta) = logit F(x; theta) - u = 0 instead, by returning

    x2 = x* - (g - stop_gradient(g)) / stop_gradient(dg/dx),     g = g(x*; u, theta),

which has the value x* and dx2/du = 1 / g'(x*), dx2/dtheta = -(dg/dtheta) / g'(x*), with
g' = f / (F (1 - F)) > 0. So J_inverse . J_forward = identity, and densities evaluated through
the inverse (a TFP distribution's log_prob, mAR interpolation through the level inverses)
train the conditioner.
"""

import tensorflow as tf
import tensorflow_probability as tfp

from bijectors import base

LOG_SCALE_MIN = -7.


class MixLogCDFCoupling(base.FlowBijector):
  """Coupling whose transformed half goes through logit(mixture-of-logistics CDF), then affine.

  Args:
    conditioner: a Keras layer mapping x1 [B, H, W, ceil(C/2)] to
      [B, H, W, conditioner_channels(C, K)]. The output is read as [..., floor(C/2), 2 + 3K]:
      per transformed channel (a_raw, t, logits_1..K, mu_1..K, log_s_1..K).
      A zero output gives the identity map.
    channels: C, the number of channels of the input.
    num_components: K, the number of logistic components.
    a_bound: bound of the scale exponent, a = a_bound * tanh(a_raw / a_bound).
    inverse_method: 'chandrupatla' (default) or 'bisection'.
    bisection_iterations: fixed iteration count for 'bisection' (None: 40 in float32 and
      lower precisions, 64 in float64).
  """

  def __init__(self, conditioner, channels, num_components=32, a_bound=2.,
               inverse_method='chandrupatla', bisection_iterations=None,
               name='mix_log_cdf_coupling'):
    if channels < 2:
      raise ValueError(f'a coupling needs at least 2 channels, got {channels}')
    if inverse_method not in ('chandrupatla', 'bisection'):
      raise ValueError(f'unknown inverse_method {inverse_method!r}')
    self.conditioner = conditioner
    self.channels = channels
    self.num_components = num_components
    self.a_bound = a_bound
    self.inverse_method = inverse_method
    self.bisection_iterations = bisection_iterations
    self.num_kept = (channels + 1) // 2
    self.num_transformed = channels // 2
    super().__init__(name=name, layers=[conditioner])

  @staticmethod
  def conditioner_channels(channels, num_components=32):
    """Output channels the conditioner must produce: floor(C/2) * (2 + 3K)."""
    return (channels // 2) * (2 + 3 * num_components)

  # -- parameters ------------------------------------------------------------------------
  def _params(self, x1):
    """Conditioner outputs for x1 -> (a, t, log_pi, mu, log_s).

    a, t: [B, H, W, c2]; log_pi, mu, log_s: [B, H, W, c2, K].
    """
    k = self.num_components
    h = self.conditioner(x1)
    h = tf.reshape(h, [-1, x1.shape[-3], x1.shape[-2], self.num_transformed, 2 + 3 * k])
    h = tf.cast(h, x1.dtype)
    a = self.a_bound * tf.tanh(h[..., 0] / self.a_bound)
    t = h[..., 1]
    log_pi = tf.nn.log_softmax(h[..., 2:2 + k], axis=-1)
    mu = h[..., 2 + k:2 + 2 * k]
    log_s = tf.maximum(h[..., 2 + 2 * k:], tf.cast(LOG_SCALE_MIN, x1.dtype))
    return a, t, (log_pi, mu, log_s)

  def _split(self, x):
    if x.shape[-1] != self.channels:
      raise ValueError(f'expected {self.channels} channels, got shape {x.shape}')
    return x[..., :self.num_kept], x[..., self.num_kept:]

  # -- one-pass API ----------------------------------------------------------------------
  def _forward_and_log_det(self, x, **unused):
    x1, x2 = self._split(x)
    a, t, mix = self._params(x1)
    log_cdf, log_sf, log_pdf = mixture_log_cdf_sf_pdf(x2, *mix)
    y2 = (log_cdf - log_sf + t) * tf.exp(a)
    log_det = a + log_pdf - log_cdf - log_sf
    return tf.concat([x1, y2], axis=-1), base.sum_event(log_det)

  def _inverse_and_log_det(self, y, **unused):
    y1, y2 = self._split(y)
    a, t, mix = self._params(y1)
    u = y2 * tf.exp(-a) - t
    x2 = self._solve_logit_cdf(u, *mix)
    log_cdf, log_sf, log_pdf = mixture_log_cdf_sf_pdf(x2, *mix)
    log_det = a + log_pdf - log_cdf - log_sf
    return tf.concat([y1, x2], axis=-1), -base.sum_event(log_det)

  # -- inverse root search -----------------------------------------------------------------
  def _solve_logit_cdf(self, u, log_pi, mu, log_s):
    """x with logit F(x) = u, element-wise, with the implicit-function gradient (module
    docstring)."""
    root = tf.stop_gradient(self._find_root(u, log_pi, mu, log_s))
    log_cdf, log_sf, log_pdf = mixture_log_cdf_sf_pdf(root, log_pi, mu, log_s)
    g = log_cdf - log_sf - u
    slope = tf.stop_gradient(tf.exp(log_pdf - log_cdf - log_sf))
    return root - (g - tf.stop_gradient(g)) / slope

  def _find_root(self, u, log_pi, mu, log_s):
    """The root of logit F(x) = u inside the exact bracket (module docstring), no gradient."""
    u = tf.stop_gradient(u)
    mix = [tf.stop_gradient(p) for p in (log_pi, mu, log_s)]
    ends = mix[1] + tf.exp(mix[2]) * u[..., None]
    low, high = tf.reduce_min(ends, axis=-1), tf.reduce_max(ends, axis=-1)

    def objective(x):
      log_cdf, log_sf = mixture_log_cdf_sf(x, *mix)
      return log_cdf - log_sf - u

    if self.inverse_method == 'bisection':
      return bisect(objective, low, high, self._num_bisections(u.dtype))
    tol = 1e-12 if u.dtype == tf.float64 else 1e-6
    return tfp.math.find_root_chandrupatla(
        objective, low=low, high=high, position_tolerance=tf.cast(tol, u.dtype),
        value_tolerance=tf.zeros([], u.dtype), max_iterations=100).estimated_root

  def _num_bisections(self, dtype):
    if self.bisection_iterations is not None:
      return self.bisection_iterations
    return 64 if dtype == tf.float64 else 40


# -- mixture of logistics, in log space --------------------------------------------------------
def mixture_log_cdf_sf(x, log_pi, mu, log_s):
  """log F(x) and log(1 - F(x)) of the mixture, for x [...] and parameters [..., K]."""
  z = (x[..., None] - mu) * tf.exp(-log_s)
  log_cdf = tf.reduce_logsumexp(log_pi + tf.math.log_sigmoid(z), axis=-1)
  log_sf = tf.reduce_logsumexp(log_pi + tf.math.log_sigmoid(-z), axis=-1)
  return log_cdf, log_sf


def mixture_log_cdf_sf_pdf(x, log_pi, mu, log_s):
  """log F, log(1 - F) and log f of the mixture, each of the shape of x.

  log f = logsumexp_k [log pi_k + log sigmoid(z_k) + log sigmoid(-z_k) - log s_k].
  """
  z = (x[..., None] - mu) * tf.exp(-log_s)
  log_sig, log_sig_neg = tf.math.log_sigmoid(z), tf.math.log_sigmoid(-z)
  log_cdf = tf.reduce_logsumexp(log_pi + log_sig, axis=-1)
  log_sf = tf.reduce_logsumexp(log_pi + log_sig_neg, axis=-1)
  log_pdf = tf.reduce_logsumexp(log_pi + log_sig + log_sig_neg - log_s, axis=-1)
  return log_cdf, log_sf, log_pdf


def bisect(objective, low, high, num_iterations):
  """Root of an increasing element-wise function inside [low, high], by fixed-count bisection.

  After N iterations the midpoint is within (high - low) 2^-(N+1) of the root. The loop has a
  static trip count, so it compiles under XLA.
  """
  def body(lo, hi):
    mid = 0.5 * (lo + hi)
    above = objective(mid) > 0.
    return tf.where(above, lo, mid), tf.where(above, mid, hi)

  low, high = tf.while_loop(lambda lo, hi: True, body, (low, high),
                            maximum_iterations=num_iterations)
  return 0.5 * (low + high)

