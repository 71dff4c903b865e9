"""``head.init=text``: a CLIP zero-shot head from class names and prompt templates.

As OpenAI's zero-shot ImageNet notebook builds its classifier: for class c,
each template t ("a photo of a {}." and ``head.templates``) is filled with the
class name, tokenised, encoded by the text tower (``models.clip_text``) and
L2-normalised; the row of class c is the L2-normalised mean over the templates,

    row_c = normalise(mean_t normalise(encode_text(tokens(t.format(name_c))))),

and the head is ``kernel = scale * rows.T`` with ``scale`` the checkpoint's
``exp(logit_scale)`` (``head.scale`` > 0 overrides it), bias 0
(``training.head_init`` explains why the unnormalised image features rank as
CLIP does).

Tokens: ``[<|startoftext|>] + BPE(text) + [<|endoftext|>]``, cut to the
context length (the last kept token then is <|endoftext|>, as open_clip's
``tokenize`` does) and padded with 0, as ``clip.tokenize``. The BPE is the
checkpoint's ``tokenizer.json`` (a path or an ``hf://`` reference, e.g.
``hf://openai/clip-vit-base-patch16/tokenizer.json``) read by Hugging Face
``tokenizers`` (an optional dependency: ``pip install tokenizers``); its
normaliser lowercases and cleans whitespace as CLIP's ``SimpleTokenizer``;
ftfy's text fixing is not applied. Class names: ``head.class_names`` (one a line) or the dataset's,
with "_" read as a space.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from vpt_jax import errors
from vpt_jax.checkpoints import hub
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.checkpoints import torch_files
from vpt_jax.models import clip_text

BASE_TEMPLATE = "a photo of a {}."
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
ENCODE_BATCH = 256  # texts per text-tower call


class TextHeadError(errors.UserError):
  """A ``head.init=text`` setting, file or class list that cannot build the head."""


def templates(extra: str) -> tuple[str, ...]:
  """"a photo of a {}." and the "|"-separated ``extra`` templates, each with one "{}"."""
  found = (BASE_TEMPLATE,) + tuple(t.strip() for t in extra.split("|") if t.strip())
  for template in found:
    if template.count("{}") != 1:
      raise TextHeadError(f"head.templates: {template!r} must hold exactly one '{{}}' for "
                          "the class name, e.g. 'a photo of the {}.'")
  return tuple(dict.fromkeys(found))


def check_settings(config) -> None:
  """``head.init=text``'s files, package and templates, before data or compute."""
  head = config.head
  checkpoint = head.text_checkpoint or config.model.init_checkpoint
  for what, path in (("head.tokenizer", head.tokenizer), ("head.text_checkpoint", checkpoint),
                     ("head.class_names", head.class_names)):
    if hub.is_hub_reference(path):
      hub.local_path(path)  # resolved (and cached) now: a missing file fails here
    elif path and not tf.io.gfile.exists(path):
      raise TextHeadError(f"{what} {path!r} does not exist; fix --config.{what}")
  if not head.tokenizer:
    raise TextHeadError("head.init=text needs the checkpoint's BPE vocabulary: pass "
                        "--config.head.tokenizer=PATH/tokenizer.json (from the model's hub page)")
  if not checkpoint:
    raise TextHeadError("head.init=text needs a CLIP checkpoint with the text tower: pass "
                        "--config.head.text_checkpoint=PATH")
  if head.text_activation not in clip_text.ACTIVATIONS:
    raise TextHeadError(f"Unknown head.text_activation {head.text_activation!r}; choose one "
                        f"of {clip_text.ACTIVATIONS}")
  templates(head.templates)
  _tokenizers_module()


def _tokenizers_module():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TextHeadError("head.init=text reads the checkpoint's tokenizer.json with Hugging "
                        "Face tokenizers, which is not installed; pip install tokenizers") from e
  return tokenizers


def load_tokenizer(path: str) -> tuple[Callable[[str], list], int, int]:
  """(text -> BPE ids without special tokens, start id, end id) of a tokenizer.json."""
  tokenizers = _tokenizers_module()
  with tf.io.gfile.GFile(hub.local_path(path)) as f:
    tokenizer = tokenizers.Tokenizer.from_str(f.read())
  start, end = tokenizer.token_to_id(START_TOKEN), tokenizer.token_to_id(END_TOKEN)
  if start is None or end is None:
    raise TextHeadError(f"head.tokenizer {path!r} has no {START_TOKEN} / {END_TOKEN} "
                        "tokens; pass the CLIP checkpoint's tokenizer.json")
  return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), start, end


def tokenize(texts: Sequence[str], encode: Callable[[str], list], start: int, end: int,
             context_length: int) -> np.ndarray:
  """(N, context_length) int32: start, the text's ids, end, zeros; cut to the length."""
  tokens = np.zeros((len(texts), context_length), np.int32)
  for i, text in enumerate(texts):
    ids = [start] + list(encode(text)) + [end]
    if len(ids) > context_length:
      ids = ids[:context_length - 1] + [end]
    tokens[i, :len(ids)] = ids
  return tokens


def l2_normalise(rows: np.ndarray) -> np.ndarray:
  """Each row (last axis) divided by its L2 norm; all-zero rows are refused."""
  norms = np.linalg.norm(rows, axis=-1, keepdims=True)
  if (norms == 0).any():
    raise errors.UserError("a class embedding is all zeros and cannot be normalised; fix "
                           "it (head.init=file: or set --config.head.normalize=False)")
  return rows / norms


def class_rows(embeddings: np.ndarray) -> np.ndarray:
  """(C, E) rows from (C, T, E) template embeddings: normalise, mean over T, normalise."""
  return l2_normalise(l2_normalise(embeddings).mean(axis=1))


def encode_all(arrays: dict, tokens: np.ndarray, num_heads: int, activation: str) -> np.ndarray:
  """(N, E) float64 text embeddings of (N, L) tokens, ENCODE_BATCH at a time."""
  encode = jax.jit(lambda a, t: clip_text.encode_text(a, t, num_heads=num_heads,
                                                      activation=activation))
  return np.concatenate([np.asarray(encode(arrays, tokens[i:i + ENCODE_BATCH]), np.float64)
                         for i in range(0, len(tokens), ENCODE_BATCH)])


def class_names_for(path: str, dataset_names: Optional[Sequence[str]],
                    num_classes: int) -> list[str]:
  """The names of ``path`` (one a line) or the dataset's, "_" read as a space."""
  if path:
    with tf.io.gfile.GFile(path) as f:
      names = [line.strip() for line in f if line.strip()]
    source = f"head.class_names {path!r}"
  else:
    names = list(dataset_names or [])
    if not names:
      raise TextHeadError("the dataset exposes no class names; write them one a line in a "
                          "file and pass --config.head.class_names=PATH")
    source = "the dataset's class names"
  if len(names) != num_classes:
    raise TextHeadError(f"{source} list {len(names)} names for {num_classes} classes; give "
                        "one name per class, in label order")
  return [name.replace("_", " ") for name in names]


def read_text_tower(path: str) -> dict:
  """The text arrays of a CLIP/open_clip checkpoint (.npz, PyTorch or safetensors)."""
  path = hub.local_path(path)  # an hf:// reference: the cached file
  flat = npz_lib.read_npz(path) if path.endswith(".npz") else torch_files.read_state_dict(path)
  return clip_text.text_arrays(flat, path)


def text_rows(config, width: int, num_classes: int,
              dataset_names: Optional[Sequence[str]]) -> tuple[np.ndarray, float]:
  """(rows (C, width) float64, scale) of ``head.init=text`` (module docstring)."""
  head = config.head
  path = head.text_checkpoint or config.model.init_checkpoint
  names = class_names_for(head.class_names, dataset_names, num_classes)
  arrays = read_text_tower(path)
  embed_dim = arrays["text_projection"].shape[1]
  if embed_dim != width:
    raise TextHeadError(
        f"{path}'s text embeddings have {embed_dim} dims but the head reads {width}-dim "
        "features; use the CLIP image tower of the same checkpoint (projected features)")
  if not head.scale and "logit_scale" not in arrays:
    raise TextHeadError(f"{path} has no logit_scale; set --config.head.scale (CLIP's is 100)")
  scale = head.scale or float(np.exp(arrays.pop("logit_scale")))
  arrays.pop("logit_scale", None)
  found = templates(head.templates)
  encode, start, end = load_tokenizer(head.tokenizer)
  tokens = tokenize([t.format(name) for name in names for t in found], encode, start, end,
                    arrays["positional_embedding"].shape[0])
  embeddings = encode_all(arrays, tokens, head.text_heads, head.text_activation)
  return class_rows(embeddings.reshape(num_classes, len(found), -1)), scale
