"""training/text_heads: ``head.init=text`` builds the head's rows as the
L2-normalised mean over templates of the L2-normalised text embeddings (checked
against an independent NumPy computation), times the checkpoint's logit scale."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

import clip_text_fixtures as fx
import run_fixtures
import tolerances
import tower_fixtures
from vpt_jax import errors
from vpt_jax.checkpoints import torch_files
from vpt_jax.models import clip_text
from vpt_jax.training import config_checks
from vpt_jax.training import setup
from vpt_jax.training import text_heads
from vpt_jax.training import trainer

NAMES = ("cat", "red_car", "small dog")
EXTRA = "the big {}.|a photo of the small {}."


def _numpy_rows(sd, names, templates):
  """Per class: normalise each template's embedding, average, normalise (float64)."""
  rows = []
  for name in names:
    tokens = np.zeros((len(templates), fx.CONTEXT), np.int32)
    for i, template in enumerate(templates):
      ids = [fx.START_ID] + fx.toy_encode(template.format(name)) + [fx.END_ID]
      tokens[i, :len(ids)] = ids
    e = fx.numpy_encode_text(sd, tokens)
    mean = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
    rows.append(mean / np.linalg.norm(mean))
  return np.stack(rows)


@pytest.mark.numerics
def test_rows_are_the_normalised_mean_template_embeddings():
  sd = fx.text_state_dict(seed=1)
  arrays = clip_text.text_arrays(sd, "tiny")
  found = text_heads.templates(EXTRA)
  names = [n.replace("_", " ") for n in NAMES]
  tokens = text_heads.tokenize([t.format(n) for n in names for t in found], fx.toy_encode,
                               fx.START_ID, fx.END_ID, fx.CONTEXT)
  embeddings = text_heads.encode_all(arrays, tokens, fx.HEADS, {"activation": "quick_gelu"})
  rows = text_heads.class_rows(embeddings.reshape(len(names), len(found), -1))
  templates = ("a photo of a {}.", "the big {}.", "a photo of the small {}.")
  np.testing.assert_allclose(rows, _numpy_rows(sd, names, templates),
                             **tolerances.FORWARD_VS_NUMPY)


def test_tokens_are_start_ids_end_then_zeros_cut_to_the_context():
  encode = {"a cat": [1, 5], "long": list(range(1, 20))}.get
  tokens = text_heads.tokenize(["a cat", "long"], encode, 12, 13, 6)
  np.testing.assert_array_equal(tokens, [[12, 1, 5, 13, 0, 0], [12, 1, 2, 3, 4, 13]])


def test_templates_start_with_the_base_and_need_one_slot():
  assert text_heads.templates(" a {} .| |a photo of a {}.") == ("a photo of a {}.", "a {} .")
  with pytest.raises(errors.UserError, match="exactly one"):
    text_heads.templates("no slot")


def test_class_names_from_a_file_or_the_dataset(tmp_path):
  path = tmp_path / "names.txt"
  path.write_text("golden_retriever\n\ntabby cat\n")
  assert text_heads.class_names_for(str(path), None, 2) == ["golden retriever", "tabby cat"]
  assert text_heads.class_names_for("", ["a_b", "c"], 2) == ["a b", "c"]
  with pytest.raises(errors.UserError, match="3 classes"):
    text_heads.class_names_for(str(path), None, 3)
  with pytest.raises(errors.UserError, match="head.class_names=PATH"):
    text_heads.class_names_for("", None, 2)


def _text_files(tmp_path, names, seed=2):
  sd = fx.text_state_dict(seed=seed, logit_scale=np.log(30.0))
  paths = {"head.text_checkpoint": fx.write_text_checkpoint(tmp_path / "clip.pt", sd),
           "head.tokenizer": fx.write_toy_tokenizer(tmp_path / "tokenizer.json")}
  (tmp_path / "names.txt").write_text("\n".join(names))
  paths["head.class_names"] = str(tmp_path / "names.txt")
  return sd, paths


@pytest.mark.numerics
def test_a_run_starts_from_the_text_head(backbone, data_dir, tmp_path, monkeypatch):
  if importlib.util.find_spec("tokenizers") is None:  # CI installs requirements.txt only
    _toy_tokenizer(monkeypatch)  # the ids tokenizer.json's toy vocabulary gives
  classes = setup.inputs.load_train_data(
      run_fixtures.tiny_config(backbone, data_dir)).num_classes
  names = ["cat", "dog", "red car", "small cat", "big dog", "the car"][:classes]
  sd, paths = _text_files(tmp_path, names)
  config = run_fixtures.tiny_config(backbone, data_dir, **paths, **{
      "method": "linear", "head.init": "text", "head.templates": EXTRA,
      "head.text_heads": fx.HEADS})
  run = setup.setup_run(config, str(tmp_path / "run"))
  try:
    head = run.state["params"]["head"]
    expected = _numpy_rows(sd, names, ("a photo of a {}.", "the big {}.",
                                       "a photo of the small {}."))
    # The checkpoint's exp(logit_scale) = 30 scales the rows.
    np.testing.assert_allclose(np.asarray(head["kernel"]) / 30.0, expected.T,
                               **tolerances.FORWARD_VS_NUMPY)
    np.testing.assert_array_equal(np.asarray(head["bias"]), np.zeros(classes))
  finally:
    setup.close(run)


def test_text_settings_are_checked_before_any_data(backbone, tmp_path, monkeypatch):
  _, paths = _text_files(tmp_path, NAMES)
  base = {"head.init": "text", "method": "linear", **paths}
  for overrides, message in (({"head.tokenizer": ""}, "head.tokenizer=PATH"),
                             ({"head.tokenizer": "/no/tok.json"}, "does not exist"),
                             ({"head.templates": "oops"}, "exactly one"),
                             ({"head.text_activation": "relu"}, "text_activation")):
    config = run_fixtures.tiny_config(backbone, "/no-data", **{**base, **overrides})
    with pytest.raises(errors.UserError, match=message):
      config_checks.validate_config(config)
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
  config = run_fixtures.tiny_config(backbone, "/no-data", **base)
  with pytest.raises(errors.UserError, match="pip install tokenizers"):
    config_checks.validate_config(config)


def test_a_text_width_other_than_the_features_is_refused(tmp_path):
  # Checked before any tokenizer is loaded: runs without the tokenizers package.
  _, paths = _text_files(tmp_path, NAMES)
  config = run_fixtures.tiny_config("", "", **paths, **{"head.init": "text"})
  with pytest.raises(errors.UserError, match="16 dims but the head reads 8-dim"):
    text_heads.text_rows(config, 8, len(NAMES), None)


def _toy_tokenizer(monkeypatch):
  """The toy vocabulary in place of HF tokenizers (so this runs without the package)."""
  monkeypatch.setattr(text_heads, "_tokenizers_module", lambda: None)
  monkeypatch.setattr(text_heads, "load_tokenizer", lambda path, siglip: (
      lambda texts, length: text_heads.tokenize(texts, fx.toy_encode, fx.START_ID, fx.END_ID,
                                                length)))


@pytest.mark.numerics
def test_zero_shot_clip_from_one_open_clip_file(backbone, data_dir, tmp_path, monkeypatch):
  """clip-test/4 reads visual.* and the head the text keys of the same file; --mode
  evaluate without training scores that zero-shot head (exported as such)."""
  _toy_tokenizer(monkeypatch)
  classes = setup.inputs.load_train_data(
      run_fixtures.tiny_config(backbone, data_dir)).num_classes
  names = ["cat", "dog", "red car", "small cat", "big dog", "the car"][:classes]
  text = fx.text_state_dict(seed=3, embed=8, logit_scale=np.log(100.0))
  text.pop("visual.conv1.weight")
  path = str(tmp_path / "open_clip_pytorch_model.bin")
  tower_fixtures.write_torch({**tower_fixtures.clip_state(text=False), **text}, path)
  (tmp_path / "names.txt").write_text("\n".join(names))
  config = run_fixtures.tiny_config(path, data_dir, **{
      "method": "linear", "model.variant": "clip-test/4", "model.image_size": 16,
      "head.init": "text", "head.tokenizer": path,  # any existing file: load is replaced
      "head.class_names": str(tmp_path / "names.txt"), "head.text_heads": fx.HEADS,
      "data.fingerprint": False})
  workdir = str(tmp_path / "zero_shot")
  reads = []  # the backbone and the text head share one read of the file
  read_state_dict = torch_files.read_state_dict
  monkeypatch.setattr(torch_files, "read_state_dict",
                      lambda p: reads.append(p) or read_state_dict(p))
  outcome = trainer.from_checkpoint(config, workdir, "evaluate")
  assert reads == [path]
  _, flat = run_fixtures.trained_params(workdir)
  expected = _numpy_rows(text, names, ("a photo of a {}.",))
  np.testing.assert_allclose(flat["head/kernel"] / 100.0, expected.T,
                             **tolerances.FORWARD_VS_NUMPY)
  assert outcome["test"]["count"] == 10 and run_fixtures.saved_steps(workdir) == []


def test_siglip_tokens_are_cut_then_padded_to_the_full_length():
  np.testing.assert_array_equal(text_heads.pad_tokens([[5, 6, 2], [7] * 6], 2, 4),
                                [[5, 6, 2, 2], [7, 7, 7, 7]])


@pytest.mark.numerics
def test_siglip_rows_scale_and_bias(tmp_path, monkeypatch):
  """SigLIP: the same normalised template means, exp(logit_scale) and logit_bias."""
  sd = fx.siglip_state_dict(seed=5)
  path = fx.write_text_checkpoint(tmp_path / "model.safetensors.pt", sd)
  siglip_ids = lambda text: fx.toy_encode(text) + [fx.END_ID]  # </s> ends, then pads
  monkeypatch.setattr(text_heads, "_tokenizers_module", lambda: None)
  monkeypatch.setattr(text_heads, "load_tokenizer", lambda p, siglip: (
      lambda texts, length: text_heads.pad_tokens([siglip_ids(t) for t in texts], fx.END_ID,
                                                  length)))
  config = run_fixtures.tiny_config("", "", **{
      "head.init": "text", "head.text_checkpoint": path, "head.tokenizer": path,
      "head.templates": "the big {}.", "head.text_heads": fx.HEADS})
  names = ["cat", "red car"]
  rows, scale, bias = text_heads.text_rows(config, fx.EMBED, 2, names)
  expected = []
  for name in names:
    tokens = text_heads.pad_tokens([siglip_ids(t.format(name)) for t in
                                    ("a photo of a {}.", "the big {}.")], fx.END_ID, fx.CONTEXT)
    e = fx.numpy_siglip_text(sd, tokens)
    mean = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
    expected.append(mean / np.linalg.norm(mean))
  np.testing.assert_allclose(rows, np.stack(expected), **tolerances.FORWARD_VS_NUMPY)
  assert (scale, bias) == (pytest.approx(10.0, rel=1e-6), -10.0)
