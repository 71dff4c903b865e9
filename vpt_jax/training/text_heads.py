"""``head.init=text``: a zero-shot head from class names and prompt templates.

As OpenAI's zero-shot ImageNet notebook builds its classifier: for class c,
each template t ("a photo of a {}." and ``head.templates``) is filled with the
class name, tokenised, encoded by the text tower (``models.clip_text``; SigLIP's
through ``models.siglip_text``) and L2-normalised; the row of class c is the
L2-normalised mean over the templates,

    row_c = normalise(mean_t normalise(encode_text(tokens(t.format(name_c))))),

and the head is ``kernel = scale * rows.T`` with ``scale`` the checkpoint's
``exp(logit_scale)`` (``head.scale`` > 0 overrides it), bias 0 for CLIP and
the checkpoint's ``logit_bias`` for SigLIP (``training.head_init`` explains
why the unnormalised image features rank as CLIP does).

CLIP tokens: ``[<|startoftext|>] + BPE(text) + [<|endoftext|>]``, cut to the
context length (the last kept token then is <|endoftext|>, as open_clip's
``tokenize`` does) and padded with 0, as ``clip.tokenize``. SigLIP tokens: the
tokenizer's own ids padded to the full length (``load_tokenizer``). The
vocabulary is the checkpoint's ``tokenizer.json`` (a path or an ``hf://``
reference, e.g. ``hf://openai/clip-vit-base-patch16/tokenizer.json``) read by
Hugging Face ``tokenizers`` (an optional dependency: ``pip install
tokenizers``); its normaliser lowercases and cleans whitespace as CLIP's
``SimpleTokenizer``; ftfy's text fixing is not applied. Class names:
``head.class_names`` (one a line) or the dataset's, with "_" read as a space.
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
from vpt_jax.models import siglip_text

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


def text_checkpoint(config) -> str:
  """The checkpoint whose text tower builds the head: ``head.text_checkpoint`` or the backbone's."""
  return config.head.text_checkpoint or config.model.init_checkpoint


def reads_backbone_file(config) -> bool:
  """Whether ``head.init=text`` reads the backbone file (then one read serves both)."""
  return (config.head.init == "text" and bool(config.model.init_checkpoint)
          and text_checkpoint(config) == config.model.init_checkpoint)


def check_settings(config) -> None:
  """``head.init=text``'s files, package and templates, before data or compute."""
  head = config.head
  checkpoint = text_checkpoint(config)
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


def load_tokenizer(path: str, siglip: bool = False) -> Callable[[Sequence[str], int], np.ndarray]:
  """(texts, context length) -> (N, length) int32 tokens, from a tokenizer.json.

  CLIP: ``tokenize`` around the BPE ids. SigLIP: the tokenizer's own ids
  (its special tokens included), cut to the length and padded with its pad
  token (the json's padding setting, else ``<pad>``, else ``</s>``) to the
  full length, as transformers' processor with ``padding="max_length"``.
  """
  tokenizers = _tokenizers_module()
  with tf.io.gfile.GFile(hub.local_path(path)) as f:
    tokenizer = tokenizers.Tokenizer.from_str(f.read())
  if siglip:
    pad = next((i for i in ((tokenizer.padding or {}).get("pad_id"),
                            tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>"))
                if i is not None), None)
    if pad is None:
      raise TextHeadError(f"head.tokenizer {path!r} has no pad token; pass the SigLIP "
                          "checkpoint's tokenizer.json")
    return lambda texts, length: pad_tokens(
        [tokenizer.encode(t).ids for t in texts], pad, length)
  start, end = tokenizer.token_to_id(START_TOKEN), tokenizer.token_to_id(END_TOKEN)
  if start is None or end is None:
    raise TextHeadError(f"head.tokenizer {path!r} has no {START_TOKEN} / {END_TOKEN} "
                        "tokens; pass the CLIP checkpoint's tokenizer.json")
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
  return lambda texts, length: tokenize(texts, encode, start, end, length)


def pad_tokens(ids: Sequence[Sequence[int]], pad: int, context_length: int) -> np.ndarray:
  """(N, context_length) int32: each id list cut to the length, then padded with ``pad``."""
  tokens = np.full((len(ids), context_length), pad, np.int32)
  for i, row in enumerate(ids):
    row = list(row)[:context_length]
    tokens[i, :len(row)] = row
  return tokens


def tokenize(texts: Sequence[str], encode: Callable[[str], list], start: int, end: int,
             context_length: int) -> np.ndarray:
  """CLIP's (N, context_length) int32: start, the text's ids, end, zeros; cut to the length."""
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


def encode_all(arrays: dict, tokens: np.ndarray, num_heads: int, options: dict) -> np.ndarray:
  """(N, E) float64 text embeddings of (N, L) tokens, ENCODE_BATCH at a time.

  ``options``: ``clip_text.encode_text``'s keywords (activation, causal, pool, epsilon).
  """
  encode = jax.jit(lambda a, t: clip_text.encode_text(a, t, num_heads=num_heads, **options))
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


def read_text_tower(path: str, flat: Optional[dict] = None) -> tuple[dict, bool]:
  """(text arrays in clip_text's names, whether SigLIP) of a CLIP, open_clip or SigLIP
  (transformers) checkpoint: .npz, PyTorch or safetensors (``flat``: its arrays, if read)."""
  path = hub.local_path(path)  # an hf:// reference: the cached file
  if flat is None:
    flat = (npz_lib.read_npz(path) if path.endswith(".npz")
            else torch_files.read_state_dict(path))
  if siglip_text.is_siglip(flat):
    return siglip_text.to_clip_names(flat, path), True
  return clip_text.text_arrays(flat, path), False


def text_rows(config, width: int, num_classes: int, dataset_names: Optional[Sequence[str]],
              checkpoint_arrays: Optional[dict] = None) -> tuple[np.ndarray, float, float]:
  """(rows (C, width) float64, scale, bias) of ``head.init=text`` (module docstring).

  ``checkpoint_arrays``: the text checkpoint's arrays, if already read (the backbone file's).
  """
  head = config.head
  path = text_checkpoint(config)
  names = class_names_for(head.class_names, dataset_names, num_classes)
  arrays, siglip = read_text_tower(path, checkpoint_arrays)
  embed_dim = arrays["text_projection"].shape[1]
  if embed_dim != width:
    raise TextHeadError(
        f"{path}'s text embeddings have {embed_dim} dims but the head reads {width}-dim "
        "features; use the image tower of the same checkpoint (its projected features)")
  if not head.scale and "logit_scale" not in arrays:
    raise TextHeadError(f"{path} has no logit_scale; set --config.head.scale (CLIP's is 100)")
  scale = head.scale or float(np.exp(arrays["logit_scale"]))
  bias = float(arrays.get("logit_bias", 0.0))  # SigLIP's; CLIP has none
  arrays = {k: v for k, v in arrays.items() if k not in clip_text.SCALARS}
  found = templates(head.templates)
  tokens = load_tokenizer(head.tokenizer, siglip)(
      [t.format(name) for name in names for t in found], arrays["positional_embedding"].shape[0])
  options = siglip_text.OPTIONS if siglip else {"activation": head.text_activation}
  embeddings = encode_all(arrays, tokens, head.text_heads, options)
  return class_rows(embeddings.reshape(num_classes, len(found), -1)), scale, bias
