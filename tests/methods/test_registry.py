"""The method registry: names, the parametrised partial-k / mlp-k and its errors."""

from __future__ import annotations

import pytest

from vpt_jax.methods import base
from vpt_jax.methods import registry


@pytest.mark.parametrize("method, backbone_dropout", [
    ("full", True), ("linear", False), ("partial-2", False), ("bias", False),
    ("adapter", False), ("sidetune", False), ("vpt_deep", False), ("cvpt", False)])
def test_backbone_mode_follows_the_reference(method, backbone_dropout):
  assert registry.get_method(method).backbone_dropout == backbone_dropout


@pytest.mark.parametrize("name, message", [
    ("mlp-1", "k must be >= 2"), ("partial-0", "k must be >= 1"), ("lorra", "did you mean lora"),
])
def test_bad_method_names_are_refused(name, message):
  with pytest.raises(ValueError, match=message):
    registry.get_method(name)


def test_the_registry_holds_the_paper_methods():
  assert sorted(registry.METHODS) == sorted([
      "adapter", "bias", "cvpt", "e2vpt", "full", "linear", "lora", "mlp-2", "mlp-3", "mlp-5",
      "mlp-9", "partial-1", "partial-2", "partial-4", "sidetune", "vfpt", "vpt+bias",
      "vpt_deep", "vpt_shallow", "vqt"]
      + ["ssf", "difffit", "ln_tune", "fact_tt", "fact_tk", "repadapter"]
      + ["houlsby", "adaptformer", "adapter_plus", "convpass"])
  assert all(registry.get_method(name).name == name for name in registry.METHODS)


def test_method_names_are_unique_across_modules():
  modules = registry._MODULES  # pylint: disable=protected-access
  names = [method.name for module in modules for method in module.METHODS]
  assert len(names) == len(set(names))


def test_unknown_names_list_every_method_and_the_closest():
  with pytest.raises(ValueError) as error:
    registry.get_method("vpt-deep")
  # Every name (pinned by test_the_registry_holds_the_paper_methods), sorted.
  assert str(error.value) == (
      f"Unknown method 'vpt-deep'; valid methods: {', '.join(sorted(registry.METHODS))} "
      "(partial-k and mlp-k take any k) (did you mean vpt_deep?)")


def test_unknown_names_without_close_ones_list_only_the_methods():
  with pytest.raises(ValueError) as error:
    registry.get_method("qqqqqqqq")
  assert str(error.value).endswith("(partial-k and mlp-k take any k)")


def test_k_below_the_smallest_names_the_smallest():
  with pytest.raises(ValueError) as error:
    registry.get_method("partial-0")
  assert str(error.value) == "partial-0: k must be >= 1, e.g. partial-1"
  with pytest.raises(ValueError) as error:
    registry.get_method("mlp-1")
  assert str(error.value) == "mlp-1: k must be >= 2, e.g. mlp-2"


@pytest.mark.parametrize("name, last_blocks, hidden_layers, optimizer", [
    ("partial-3", 3, 0, "adamw"), ("partial-12", 12, 0, "adamw"), ("mlp-4", 0, 3, "sgd"),
    ("mlp-2", 0, 1, "sgd")])
def test_any_k_builds_its_method(name, last_blocks, hidden_layers, optimizer):
  method = registry.get_method(name)
  assert isinstance(method, base.Method)
  assert (method.name, method.last_blocks, method.head_hidden_layers, method.optimizer) == (
      name, last_blocks, hidden_layers, optimizer)
  assert method.settings == ("mlp" if name.startswith("mlp") else "")


def test_partial_k_rules_train_the_last_k_blocks_and_the_final_norm():
  blocks = [f"Transformer/encoderblock_{i}" for i in range(4)]
  rules = registry.get_method("partial-2").rules(blocks, "norm/.*")
  assert rules == (
      ("(Transformer/encoderblock_2|Transformer/encoderblock_3)/.*", "train"),
      ("norm/.*", "train"), ("head/.*", "train"), (".*", "frozen"))
  with pytest.raises(ValueError, match="the model has 4; use partial-k with k <= 4"):
    registry.get_method("partial-5").rules(blocks, "norm/.*")
