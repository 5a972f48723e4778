"""The priors of a multi-scale flow with Gaussian factors, top-down (Glow; DenseFlow).

For latents [z_L, ..., z_1] (``bijectors.multiscale.MultiScaleFlow.latent_shapes``):

    p(z_L)          learned per-channel Gaussian N(mu_c, sigma_c^2)   (``DiagonalGaussianPrior``)
    p(z_i | r_i)    split_prior='learned':  Glow's N(mu(r_i), sigma(r_i)^2) from a
                                            zero-initialised conv over the kept half r_i
                                            (``GlowSplitPrior``; starts as N(0, I))
                    split_prior='standard': N(0, I)                   (``StandardNormalPrior``)

Glow (Kingma & Dhariwal 2018) uses the learned split prior; DenseFlow (Grcic et al. 2021)
factors out under N(0, I). Layer names (``prior_top``, ``prior_split<k>``) are part of the
checkpoint layout.
"""

from tfflows.distributions import priors

SPLIT_PRIORS = ('learned', 'standard')


def split_priors(latent_shapes, split_prior='learned'):
  """One prior layer per latent shape [H, W, C], top-down; raises ValueError for an unknown
  ``split_prior``."""
  if split_prior not in SPLIT_PRIORS:
    raise ValueError(f'split_prior must be one of {SPLIT_PRIORS}, got {split_prior!r}.')
  latent_shapes = list(latent_shapes)
  result = [priors.DiagonalGaussianPrior(latent_shapes[0], name='prior_top')]
  for k, shape in enumerate(latent_shapes[1:], start=1):
    if split_prior == 'learned':
      result.append(priors.GlowSplitPrior(shape, name=f'prior_split{k}'))
    else:
      result.append(priors.StandardNormalPrior(shape, name=f'prior_split{k}'))
  return result
