"""The stacked many-task model: one forward for a structure group, each example its
task's logits, the backbone's matmuls batched over the examples."""

import json
import os
import re

import numpy as np
import pytest

import export_fixtures
from vpt_jax.export import serving
from vpt_jax.export import task_export

_write_export = export_fixtures.write_export
_images = export_fixtures.random_images
_check_mixed_batch = export_fixtures.check_mixed_batch
workspace = export_fixtures.workspace


@pytest.mark.numerics
def test_mixed_batch_equals_each_task_alone(workspace):
  _, backbone, exports = workspace
  server = serving.MultiTaskServer(exports, backbone)
  assert len(server.groups) == 1  # one stacked tree, one forward for all three
  tasks = ["a", "b", "c", "b", "a", "c", "c"]
  _check_mixed_batch(server, exports, backbone, tasks, _images(len(tasks)))
  # The backbone is held once; the tasks add their prompts and padded heads.
  memory = server.memory()
  width, depth, prompts = 16, 2, 2
  assert memory["task_bytes"] == 4 * 3 * (depth * prompts * width + width * 5 + 5)
  backbone_params = sum(v.size for k, v in task_export.npz_lib.read_npz(backbone).items()
                        if not k.startswith(("head", "pre_logits")))
  assert memory["backbone_bytes"] == 4 * backbone_params  # once, not per task


def test_backbone_matmuls_are_batched_not_looped(workspace):
  _, backbone, exports = workspace
  server = serving.MultiTaskServer(exports, backbone)
  group = server.groups[0]
  batch = 3
  fused = group.lower(_images(batch), np.array([0, 1, 2])).compile().as_text()
  assert " while(" not in fused  # no loop over the examples
  # Every backbone projection is one matmul whose rows are all examples' tokens
  # (e.g. f32[3 x 17, 32] = dot(tokens, kernel)) with the kernel unbatched: no
  # per-example copy of a backbone weight, and no unrolled per-example matmuls
  # (those would number batch x depth x 6).
  projections = [line for line in fused.splitlines() if " dot(" in line and re.search(
      r"/(MlpBlock_0/Dense_\d|MultiHeadDotProductAttention_0/(query|key|value|out))/", line)]
  depth = 2
  assert len(projections) == depth * 6
  assert not any("lhs_batch_dims" in line or "rhs_batch_dims" in line for line in projections)


@pytest.mark.numerics
def test_structures_are_grouped_and_each_example_matches(workspace):
  root, backbone, exports = workspace
  exports = {
      "a": exports["a"], "b": exports["b"],
      "deep3": _write_export(root / "deep3", backbone, "vpt_deep", 4, 20,
                             **{"prompt.num_prompts": 3}),
      "mlp": _write_export(root / "mlp", backbone, "mlp-2", 3, 21),      # BatchNorm head
      "bitfit": _write_export(root / "bitfit", backbone, "bias", 6, 22),  # backbone biases
      "lora": _write_export(root / "lora", backbone, "lora", 2, 23),
      # Trained with the attention kernel that differs from einsum only in its
      # backward pass: it joins a and b.
      "recompute": _write_export(root / "recompute", backbone, "vpt_deep", 4, 24,
                                 **{"model.attention": "recompute"}),
  }
  with open(os.path.join(exports["recompute"], "task.json")) as f:
    assert json.load(f)["model"]["attention"] == "recompute"
  server = serving.MultiTaskServer(exports, backbone)
  assert sorted(sorted(g.task_names) for g in server.groups) == [
      ["a", "b", "recompute"], ["bitfit"], ["deep3"], ["lora"], ["mlp"]]
  tasks = ["lora", "a", "bitfit", "recompute", "mlp", "deep3", "b", "bitfit", "a", "mlp"]
  _check_mixed_batch(server, exports, backbone, tasks, _images(len(tasks), seed=1))


@pytest.mark.numerics
def test_reparameterisable_methods_share_a_mixed_batch(workspace):
  # SSF, DiffFit (per-task LayerNorm scales and biases, as LN-tune), FacT-TK,
  # RepAdapter beside VPT on one backbone: each example gets its own task's logits.
  root, backbone, exports = workspace
  methods = ("ssf", "difffit", "fact_tk", "repadapter")
  exports = {"a": exports["a"], **{
      method: _write_export(root / method, backbone, method, 3, 60 + i,
                            **{"fact.rank": 2, "repadapter.dim": 4})
      for i, method in enumerate(methods)}}
  server = serving.MultiTaskServer(exports, backbone)
  assert sorted(sorted(g.task_names) for g in server.groups) == sorted(
      [[task] for task in exports])
  tasks = ["ssf", "a", "fact_tk", "repadapter", "difffit", "ssf"]
  _check_mixed_batch(server, exports, backbone, tasks, _images(len(tasks), seed=2))


@pytest.mark.numerics
def test_bottleneck_adapters_serve_in_a_mixed_batch(workspace):
  root, backbone, _ = workspace
  small = {"adaptformer.bottleneck": 4}  # the tiny backbone is 16 wide
  exports = {
      "houlsby": _write_export(root / "houlsby", backbone, "houlsby", 3, 30),
      # Trained with another stochastic depth (training-only): it shares the forward.
      "houlsby2": _write_export(root / "houlsby2", backbone, "houlsby", 4, 31,
                                **{"houlsby.backbone_drop_path": 0.0}),
      "adaptformer": _write_export(root / "adaptformer", backbone, "adaptformer", 2, 32,
                                   **small),
      "adapter_plus": _write_export(root / "adapter_plus", backbone, "adapter_plus", 5, 33),
      "convpass": _write_export(root / "convpass", backbone, "convpass", 3, 34),
  }
  server = serving.MultiTaskServer(exports, backbone)
  assert sorted(sorted(g.task_names) for g in server.groups) == [
      ["adapter_plus"], ["adaptformer"], ["convpass"], ["houlsby", "houlsby2"]]
  tasks = ["convpass", "houlsby", "adaptformer", "houlsby2", "adapter_plus"]
  _check_mixed_batch(server, exports, backbone, tasks, _images(len(tasks), seed=2))
