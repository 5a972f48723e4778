"""TF Serving's warm-up file: requests it replays when it loads a model, before the first client.

    write_warmup_requests(path, [('serving_default', {'images': uint8_batch}), ...])
    read_warmup_requests(path)   # [(signature_name, {input name: numpy array}), ...]

TF Serving reads ``<version dir>/assets.extra/tf_serving_warmup_requests`` (``WARMUP_PATH``) at
load time and runs every request in it (up to 1,000), so the graph's first-call work (kernel
selection, oneDNN primitive creation, XLA compilation where enabled) happens before the model
answers any client. The file is a TFRecord file (uncompressed) whose records are serialized
``tensorflow.serving.PredictionLog`` messages; each holds a ``predict_log`` whose
``PredictRequest`` names the signature in ``model_spec.signature_name`` and holds the inputs as
``TensorProto`` values (TF Serving's docs, "SavedModel Warmup"). The messages come from the
protos of the ``tensorflow-serving-api`` package (a dependency of tfflows, pinned to the
TensorFlow release: it only ships the protocol-buffer modules).
"""

import os

import numpy as np
import tensorflow as tf

WARMUP_DIR = 'assets.extra'
WARMUP_FILE = 'tf_serving_warmup_requests'
WARMUP_PATH = os.path.join(WARMUP_DIR, WARMUP_FILE)
MAX_REQUESTS = 1000  # TF Serving reads at most this many records


def _protos():
  try:
    # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2
  except ImportError as error:
    raise ImportError('the TF Serving warm-up file needs the tensorflow-serving-api package '
                      f'(pip install "tensorflow-serving-api>=2.21,<2.22"): {error}') from None
  return predict_pb2, prediction_log_pb2


def prediction_log(signature_name, inputs, model_name=''):
  """A PredictionLog holding a PredictRequest for ``signature_name`` with ``inputs``
  ({name: array-like}, each converted with its own dtype)."""
  predict_pb2, prediction_log_pb2 = _protos()
  request = predict_pb2.PredictRequest()
  request.model_spec.signature_name = signature_name
  if model_name:
    request.model_spec.name = model_name
  for name, value in inputs.items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
  return prediction_log_pb2.PredictionLog(
      predict_log=prediction_log_pb2.PredictLog(request=request))


def write_warmup_requests(path, requests, model_name=''):
  """Writes ``requests`` ([(signature name, {input name: array})]) as the TFRecord file at
  ``path`` (normally EXPORT_DIR/assets.extra/tf_serving_warmup_requests). Returns path."""
  requests = list(requests)
  if not requests:
    raise ValueError('a warm-up file needs at least one request.')
  if len(requests) > MAX_REQUESTS:
    raise ValueError(f'TF Serving replays at most {MAX_REQUESTS} warm-up requests; got '
                     f'{len(requests)}.')
  logs = [prediction_log(name, inputs, model_name) for name, inputs in requests]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with tf.io.TFRecordWriter(os.fspath(path)) as writer:
    for log in logs:
      writer.write(log.SerializeToString())
  return path


def read_warmup_requests(path):
  """[(signature name, {input name: numpy array})] of a warm-up file; ValueError for a record
  that is not a PredictionLog with a predict_log."""
  _, prediction_log_pb2 = _protos()
  requests = []
  for i, record in enumerate(tf.data.TFRecordDataset(os.fspath(path)).as_numpy_iterator()):
    log = prediction_log_pb2.PredictionLog()
    log.ParseFromString(record)
    if log.WhichOneof('log_type') != 'predict_log':
      raise ValueError(f'{path}: record {i} is not a predict_log '
                       f'({log.WhichOneof("log_type")}).')
    request = log.predict_log.request
    requests.append((request.model_spec.signature_name,
                     {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}))
  return requests
