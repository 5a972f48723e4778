"""Reads a flagfile as the program does: with train.main's absl flags, not by hand."""

from train import run
from train.flags import FLAGS


def parse(path, *args):
  """(flag values as a dict, FlowConfig) of ``python -m train.main --flagfile=PATH ARGS``.

  Raises absl's flags.Error for a misspelt flag or a bad value, as the program would; FLAGS is
  left unparsed either way."""
  FLAGS.unparse_flags()
  try:
    FLAGS(['train.main', f'--flagfile={path}', *args])
    return FLAGS.flag_values_dict(), run._flow_config(FLAGS)  # pylint: disable=protected-access
  finally:
    FLAGS.unparse_flags()
