"""MAE / MoCo v3 ViT checkpoints in the official timm layouts, on the "test" size."""

from __future__ import annotations

import collections

import numpy as np

import torch_fixtures as tf
from vpt_jax.methods import registry

# "test" size: width 16, MLP 32, 2 heads of 8, 2 blocks; 16 px images, 4 px patches.
D, MLP, HEADS, HEAD_DIM, DEPTH, PATCH, IMAGE = 16, 32, 2, 8, 2, 4, 16
GRID = IMAGE // PATCH
POSEMB = {"mae": "Transformer/posembed_input/pos_embedding",
          "moco": "Transformer/posembed_fixed/pos_embedding"}


def official_state_dict(flavour: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors under the official timm names and (out, in) shapes."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.5 * rng.standard_normal(shape)).astype(np.float32)
  state = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + GRID * GRID, D),
           "patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "patch_embed.proj.bias": r(D)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    state.update({
        b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
        b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
        b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
        b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
        b + "mlp.fc1.weight": r(MLP, D), b + "mlp.fc1.bias": r(MLP),
        b + "mlp.fc2.weight": r(D, MLP), b + "mlp.fc2.bias": r(D)})
  # MAE's pretrained encoder keeps its final norm (the reference deletes it);
  # MoCo v3's linear-probe checkpoint has the norm and the 1000-class head.
  state["norm.weight"], state["norm.bias"] = 1 + r(D), r(D)
  if flavour == "moco":
    state["head.weight"], state["head.bias"] = r(10, D), r(10)
  return state


def write_official_file(flavour: str, path, seed: int = 0) -> dict[str, np.ndarray]:
  """Writes the flavour's checkpoint container in torch's zip format; returns the tensors."""
  state = official_state_dict(flavour, seed)
  tensors = collections.OrderedDict(
      (name, tf.tensor_of(value, str(i))) for i, (name, value) in enumerate(state.items()))
  if flavour == "mae":  # mae_pretrain_vit_base.pth: {"model": state_dict}
    tf.write_torch_zip({"model": tensors}, path, archive="mae_pretrain_vit_base")
  else:  # linear-vit-b-300ep.pth.tar (main_lincls.py), DistributedDataParallel names
    momentum = tf.tensor_of(np.zeros(3, np.float32), "m")
    tf.write_torch_zip({"epoch": 90, "arch": "vit_base",
                        "state_dict": collections.OrderedDict(
                            ("module." + k, v) for k, v in tensors.items()),
                        "best_acc1": tf.tensor_of(np.array(76.7, np.float32), "acc"),
                        "optimizer": {"state": {0: {"momentum_buffer": momentum}},
                                      "param_groups": [{"lr": 0.1, "params": [0]}]}}, path)
  return state


def flavour_spec(method, variant, **overrides):
  """The model spec of ``method`` on a flavour variant at IMAGE px (3 prompts if it has any)."""
  spec = dict(method=method, variant=variant, image_size=IMAGE, dropout_rate=0.0,
              skip_dead_work=True, dtype="float32", num_prompts=0, prompt_dropout=0.0,
              prompt_projection=-1, pool="original")
  if registry.get_method(method).uses_prompts:
    spec.update(num_prompts=3)
  spec.update(overrides)
  return spec
