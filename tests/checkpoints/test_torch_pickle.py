"""The pickle inside a torch.save archive: code and foreign globals are refused and never run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import torch_fixtures as tf
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import torch_files
from vpt_jax.checkpoints import torch_pickle


def _payload_files(tmp_path):
  """(name, data.pkl bytes, marker) for pickles that would touch `marker` if run."""
  cases = []
  for module, name, make_args in [
      ("os", "system", lambda m: (f"touch {m}",)),
      ("posix", "system", lambda m: (f"touch {m}",)),
      ("builtins", "eval", lambda m: (f"open({str(m)!r}, 'w').close()",)),
      ("builtins", "exec", lambda m: (f"open({str(m)!r}, 'w').close()",)),
      ("subprocess", "call", lambda m: (["touch", str(m)],)),
  ]:
    marker = tmp_path / f"ran_{module}_{name}"
    state = {"weight": tf.tensor_of(np.ones(2, np.float32), "0"),
             "evil": tf.Reduce(module, name, make_args(marker))}
    cases.append((f"{module}.{name}", tf.pickle_bytes(state)[0], marker))
  return cases


def test_pickled_code_is_refused_and_never_runs(tmp_path):
  for global_name, payload, marker in _payload_files(tmp_path):
    path = tmp_path / "evil.pth"
    tf.write_torch_zip({"weight": tf.tensor_of(np.ones(2, np.float32), "0")}, path,
                       data_pkl=payload)
    with pytest.raises(torch_pickle.ForbiddenGlobalError) as info:
      torch_files.read_state_dict(str(path))
    assert info.value.global_name == global_name
    assert isinstance(info.value, npz.CheckpointError)
    message = str(info.value)
    assert global_name in message and "execute code" in message and "refused" in message
    assert not marker.exists(), f"{global_name} ran"
  # The payloads are live: plain pickle.loads runs one (written without tensors,
  # which would need torch to unpickle).
  marker = tmp_path / "ran_plain_pickle"
  pickle.loads(tf.pickle_bytes({"evil": tf.Reduce("os", "system", (f"touch {marker}",))})[0])
  assert marker.exists(), "the payload should run under plain pickle"


def test_numpy_reconstruction_and_model_classes_are_refused(tmp_path):
  payload = pickle.dumps({"w": np.ones(3, np.float32)}, protocol=2)  # numpy's own reduce
  path = tmp_path / "numpy_inside.pth"
  tf.write_torch_zip({}, path, data_pkl=payload)
  with pytest.raises(torch_pickle.ForbiddenGlobalError, match=r"numpy\.core\.multiarray\."
                     r"_reconstruct|numpy\._core\.multiarray\._reconstruct"):
    torch_files.read_state_dict(str(path))
  # A whole pickled model (torch.save(model)) needs its class.
  payload = tf.pickle_bytes({"m": tf.Reduce("timm.models.vision_transformer",
                                            "VisionTransformer", ())})[0]
  tf.write_torch_zip({}, path, data_pkl=payload)
  with pytest.raises(torch_pickle.ForbiddenGlobalError,
                     match=r"timm\.models\.vision_transformer\.VisionTransformer"):
    torch_files.read_state_dict(str(path))

