"""A tiny CLIP text tower written key for key as OpenAI/open_clip store it, a toy
vocabulary, and an independent float64 NumPy forward of the text tower."""

from __future__ import annotations

import json

import numpy as np

import torch_fixtures

# Toy vocabulary: 0 pads; the special tokens take the highest ids, as in CLIP's
# (so the end-of-text token is each sequence's argmax).
WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "car", "small", "big", ".")
START_ID, END_ID = len(WORDS) + 1, len(WORDS) + 2
VOCAB = {"<pad>": 0, **{w: i + 1 for i, w in enumerate(WORDS)},
         "<|startoftext|>": START_ID, "<|endoftext|>": END_ID}
WIDTH, LAYERS, HEADS, CONTEXT, EMBED = 16, 2, 2, 10, 16


def toy_encode(text: str) -> list[int]:
  """The toy vocabulary's ids of ``text``: lowercased words, "." split off."""
  return [VOCAB[w] for w in text.lower().replace(".", " . ").split()]


def text_state_dict(seed: int = 0, *, width=WIDTH, layers=LAYERS, context=CONTEXT,
                    embed=EMBED, logit_scale=np.log(100.0)) -> dict[str, np.ndarray]:
  """Random float32 arrays under CLIP's text keys (PyTorch layouts), and one visual key."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=0.3: (s * rng.standard_normal(shape)).astype(np.float32)
  sd = {"token_embedding.weight": normal(len(VOCAB), width),
        "positional_embedding": normal(context, width, s=0.1),
        "ln_final.weight": 1 + normal(width, s=0.1), "ln_final.bias": normal(width, s=0.1),
        "text_projection": normal(width, embed),
        "logit_scale": np.asarray(logit_scale, np.float32),
        "visual.conv1.weight": normal(width, 3, 4, 4)}  # dropped by the text reader
  for i in range(layers):
    p = f"transformer.resblocks.{i}."
    sd.update({p + "ln_1.weight": 1 + normal(width, s=0.1), p + "ln_1.bias": normal(width),
               p + "attn.in_proj_weight": normal(3 * width, width),
               p + "attn.in_proj_bias": normal(3 * width),
               p + "attn.out_proj.weight": normal(width, width),
               p + "attn.out_proj.bias": normal(width),
               p + "ln_2.weight": 1 + normal(width, s=0.1), p + "ln_2.bias": normal(width),
               p + "mlp.c_fc.weight": normal(4 * width, width),
               p + "mlp.c_fc.bias": normal(4 * width),
               p + "mlp.c_proj.weight": normal(width, 4 * width),
               p + "mlp.c_proj.bias": normal(width)})
  return sd


def write_text_checkpoint(path, sd: dict) -> str:
  """``sd`` as a torch.save zip of a state dict (open_clip's .pt), keys as given."""
  torch_fixtures.write_torch_zip({k: torch_fixtures.tensor_of(v, str(i))
                                  for i, (k, v) in enumerate(sd.items())}, path)
  return str(path)


def write_toy_tokenizer(path) -> str:
  """A tokenizer.json of the toy vocabulary (word level, lowercasing), for HF tokenizers."""
  spec = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": VOCAB[t], "content": t, "single_word": False,
                            "lstrip": False, "rstrip": False, "normalized": False,
                            "special": True} for t in ("<|startoftext|>", "<|endoftext|>")],
          "normalizer": {"type": "Lowercase"},
          "pre_tokenizer": {"type": "BertPreTokenizer"},
          "post_processor": None, "decoder": None,
          "model": {"type": "WordLevel", "vocab": VOCAB, "unk_token": "<pad>"}}
  with open(path, "w") as f:
    json.dump(spec, f)
  return str(path)


def _layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def numpy_encode_text(sd: dict, tokens: np.ndarray, heads: int = HEADS,
                      quick_gelu: bool = True) -> np.ndarray:
  """float64 CLIP text forward, per sequence and per head; pools at the END_ID position."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  out = []
  for seq in tokens:
    x = sd["token_embedding.weight"][seq] + sd["positional_embedding"]
    length, width = x.shape
    d = width // heads
    for i in range(sum(k.endswith("ln_1.weight") for k in sd)):
      p = {k.split(f"resblocks.{i}.", 1)[1]: v for k, v in sd.items()
           if f"resblocks.{i}." in k}
      h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
      wq, wk, wv = np.split(p["attn.in_proj_weight"], 3)
      bq, bk, bv = np.split(p["attn.in_proj_bias"], 3)
      q, k, v = h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv
      heads_out = []
      for j in range(heads):
        cols = slice(j * d, (j + 1) * d)
        scores = q[:, cols] @ k[:, cols].T / np.sqrt(d)
        scores[np.triu_indices(length, 1)] = -np.inf  # token t attends to tokens <= t
        w = np.exp(scores - scores.max(1, keepdims=True))
        heads_out.append((w / w.sum(1, keepdims=True)) @ v[:, cols])
      x = x + np.concatenate(heads_out, 1) @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
      h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"]) @ p["mlp.c_fc.weight"].T
      h = h + p["mlp.c_fc.bias"]
      if quick_gelu:
        h = h / (1 + np.exp(-1.702 * h))
      else:
        from scipy.special import erf  # pylint: disable=g-import-not-at-top
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
      x = x + h @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
    x = _layer_norm(x, sd["ln_final.weight"], sd["ln_final.bias"])
    out.append(x[list(seq).index(END_ID)] @ sd["text_projection"])
  return np.stack(out)


def siglip_state_dict(seed: int = 0, *, width=WIDTH, layers=LAYERS, context=CONTEXT,
                      embed=EMBED) -> dict[str, np.ndarray]:
  """Random float32 arrays under transformers' SiglipModel text keys (and its scalars)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=0.3: (s * rng.standard_normal(shape)).astype(np.float32)
  t = "text_model."
  sd = {t + "embeddings.token_embedding.weight": normal(len(VOCAB), width),
        t + "embeddings.position_embedding.weight": normal(context, width, s=0.1),
        t + "final_layer_norm.weight": 1 + normal(width, s=0.1),
        t + "final_layer_norm.bias": normal(width, s=0.1),
        t + "head.weight": normal(embed, width), t + "head.bias": normal(embed),
        "logit_scale": np.array([np.log(10.0)], np.float32),
        "logit_bias": np.array([-10.0], np.float32),
        "vision_model.post_layernorm.weight": normal(width)}  # ignored by the text reader
  for i in range(layers):
    p = f"{t}encoder.layers.{i}."
    for name, (rows, cols) in {"self_attn.q_proj": (width, width),
                               "self_attn.k_proj": (width, width),
                               "self_attn.v_proj": (width, width),
                               "self_attn.out_proj": (width, width),
                               "mlp.fc1": (3 * width, width),
                               "mlp.fc2": (width, 3 * width)}.items():
      sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = normal(rows, cols), normal(rows)
    for name in ("layer_norm1", "layer_norm2"):
      sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = 1 + normal(width, s=0.1), normal(width)
  return sd


def numpy_siglip_text(sd: dict, tokens: np.ndarray, heads: int = HEADS) -> np.ndarray:
  """float64 SigLIP text forward on transformers' names: full attention, LayerNorm eps
  1e-6, tanh GELU, final LayerNorm, the last position, head (with bias)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  t = "text_model."
  gelu_tanh = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  linear = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]
  norm = lambda x, name: _layer_norm(x, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)
  out = []
  for seq in tokens:
    x = sd[t + "embeddings.token_embedding.weight"][seq] + sd[
        t + "embeddings.position_embedding.weight"]
    d = x.shape[1] // heads
    for i in range(sum(k.endswith("layer_norm1.weight") for k in sd)):
      p = f"{t}encoder.layers.{i}."
      h = norm(x, p + "layer_norm1")
      q, k, v = (linear(h, f"{p}self_attn.{n}_proj") for n in "qkv")
      mixed = []
      for j in range(heads):
        cols = slice(j * d, (j + 1) * d)
        scores = q[:, cols] @ k[:, cols].T / np.sqrt(d)  # every token sees every token
        w = np.exp(scores - scores.max(1, keepdims=True))
        mixed.append((w / w.sum(1, keepdims=True)) @ v[:, cols])
      x = x + linear(np.concatenate(mixed, 1), p + "self_attn.out_proj")
      x = x + linear(gelu_tanh(linear(norm(x, p + "layer_norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    out.append(linear(norm(x, t + "final_layer_norm")[-1], t + "head"))
  return np.stack(out)
