"""A run's measured costs: parameter counts with and without the head, export bytes,
throughputs, memory and XLA's FLOPs against a hand count of the tiny ViT's matmuls."""

import os

import numpy as np

from run_fixtures import tiny_config
from vpt_jax.params import freezing
from vpt_jax.training import costs
from vpt_jax.training import trainer

# backbone and data_dir: fixtures of conftest.py.


def test_trainable_without_head_and_folder_bytes(tmp_path):
  params = {"head": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)},
            "vpt": {"prompts": np.zeros((2, 5, 4))}, "encoder": {"w": np.zeros((4, 4))}}
  labels = {"head": {"kernel": freezing.TRAIN, "bias": freezing.TRAIN},
            "vpt": {"prompts": freezing.TRAIN}, "encoder": {"w": freezing.FROZEN}}
  assert costs.trainable_without_head(params, labels) == 40
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.bin").write_bytes(b"x" * 10)
  (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 7)
  assert costs.folder_bytes(str(tmp_path)) == 17
  assert costs.folder_bytes(str(tmp_path / "missing")) is None


def _matmul_flops(tokens, width=16, mlp=32):
  """2 x multiply-adds of one ViT block's dense layers and attention on ``tokens``."""
  return 2 * (4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp)


def test_a_run_records_its_costs(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(tiny_config(backbone, data_dir, **{
      "optim.epochs": 2, "log_every_steps": 1, "eval.costs": True}), workdir)
  cost = results["cost"]
  prompts, head = 2 * 2 * 16, 16 * 3 + 3  # test/4: depth 2, width 16; 2 prompts; 3 classes
  assert cost["trainable_params"] == results["trainable_params"] == prompts + head
  assert cost["trainable_params_without_head"] == prompts
  export_dir = os.path.join(workdir, "export")
  on_disk = sum(os.path.getsize(os.path.join(root, name))
                for root, _, names in os.walk(export_dir) for name in names)
  assert cost["export_bytes"] == on_disk > 0
  assert cost["train_steps_timed"] == 5  # 6 steps, timed from the first sync
  assert cost["train_images_per_s"] > 0 and cost["inference_images_per_s"] > 0
  assert cost["fused_settings"] == 1 and cost["mergeable"] is False  # VPT adds tokens
  assert cost["peak_memory_bytes"] > 0 and cost["memory_kind"]
  assert cost["device"]["platform"] == "cpu" and cost["device"]["count"] >= 1
  # 32 px, 4 px patches: 64 patches + CLS + 2 deep prompts; the last block may
  # compute fewer rows (CLS only), so bounds: embedding + first block <= XLA's
  # count (which adds softmax, norms, GELU) <= 3 x two full blocks.
  embed = 2 * 64 * 48 * 16
  assert embed + _matmul_flops(67) <= cost["flops_per_image"] <= 3 * (embed + 2 * _matmul_flops(67))
