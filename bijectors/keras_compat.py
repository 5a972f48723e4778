"""The one place the library reaches into Keras' private modules (``keras.src``).

``bijectors.repeated`` runs the template step of a loop outside the Keras layer call that
started the pass (inside a ``tf.while_loop`` body, and again in the rematerialised backward
pass), so its layers cannot inherit ``training`` the way nested layer calls do. Keras 3 keeps
that value in the call context of the layer call in progress, and offers no public API to read
it or to open a context: these two functions use ``keras.src.backend.common.global_state`` and
``keras.src.layers.layer.CallContext``, which exist with this meaning in the Keras versions
setup.cfg allows. tests/test_structure.py allows ``keras.src`` imports in this module only, and
checks that the installed Keras lies in setup.cfg's range; a Keras release that moves them
fails here, at import, not silently in training mode.
"""

import contextlib

from keras.src.backend.common import global_state
from keras.src.layers.layer import CallContext

_CALL_CONTEXT = 'current_call_ctx'


def current_training():
  """The ``training`` value of the Keras call in progress (None outside any layer call)."""
  context = global_state.get_global_attribute(_CALL_CONTEXT)
  return None if context is None else context.get_value('training')


@contextlib.contextmanager
def training_scope(training):
  """Runs Keras layers called inside with ``training`` (as an outer layer call would)."""
  previous = global_state.get_global_attribute(_CALL_CONTEXT)
  context = CallContext(entry_layer=None)
  context.set_value('training', training)
  global_state.set_global_attribute(_CALL_CONTEXT, context)
  try:
    yield
  finally:
    global_state.set_global_attribute(_CALL_CONTEXT, previous)
