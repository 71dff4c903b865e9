"""Every method, one config field away: what trains, how much, that it learns,
that it exports and reloads.

Each method is built from the config (``configs.common`` + ``apply_method`` +
its settings section), loaded onto a tiny fixture backbone with the method's
fresh patterns, and trained with its own default optimizer for a few real
steps; the results are shared by the tests of that method (one compile each).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
from method_fixtures import assert_only_trainable_changed
from method_fixtures import train_steps
from vpt_jax.checkpoints import npz
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.export import merging
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import sidetune
from vpt_jax.methods import registry
from vpt_jax.models import vit
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps

# The tiny backbones: width D 16, MLP 32, 2 heads, 16 px images with 4 px patches.
D, MLP, HEADS, PATCH, IMAGE, CLASSES = 16, 32, 2, 4, 16, 5
TOKENS = 1 + (IMAGE // PATCH) ** 2
M, KV, RANK, REDUCTION, SIDE = 3, 2, 2, 4, (4, 8)
BOTTLENECK = 4
MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
# Learning rates that make a few steps on one batch visibly reduce the loss.
LEARNING_RATES = {"sgd": 0.2, "adamw": 0.01, "torch_adamw": 0.01, "timm_adamw": 0.01}

# (case id, method, config overrides, depth of the backbone).
CASES = {
    "linear": ("linear", {}, 2),
    "full": ("full", {}, 2),
    "partial-1": ("partial-1", {}, 2),
    "partial-2": ("partial-2", {}, 4),
    "partial-4": ("partial-4", {}, 4),
    "mlp-3": ("mlp-3", {}, 2),
    "bias": ("bias", {}, 2),
    "adapter": ("adapter", {}, 2),
    "adapter-vpt_reference": ("adapter", {"adapter.init": "vpt_reference"}, 2),
    "sidetune": ("sidetune", {}, 2),
    "vpt_shallow": ("vpt_shallow", {}, 2),
    "vpt_deep": ("vpt_deep", {}, 2),
    "vpt+bias": ("vpt+bias", {}, 2),
    "cvpt": ("cvpt", {}, 2),
    "lora": ("lora", {"lora.targets": "query,key,value,out"}, 2),
    "vfpt": ("vfpt", {}, 2),
    "e2vpt": ("e2vpt", {}, 2),
    "houlsby": ("houlsby", {}, 2),
    "adaptformer": ("adaptformer", {"adaptformer.norm": "in"}, 2),
    "adapter_plus": ("adapter_plus", {}, 2),
    "convpass": ("convpass", {}, 2),
    # Re-parameterisable methods (their own dropout and drop path 0.1 train too).
    "ssf": ("ssf", {}, 2),
    "difffit": ("difffit", {}, 2),
    "ln_tune": ("ln_tune", {}, 2),
    "fact_tt": ("fact_tt", {"fact.rank": RANK, "fact.scale": 10.0}, 2),
    "fact_tk": ("fact_tk", {"fact.rank": RANK, "fact.scale": 10.0}, 2),
    "repadapter": ("repadapter", {"repadapter.dim": 4, "repadapter.scale": 5.0}, 2),
    "vqt": ("vqt", {}, 2),
    # A VPT ablation (methods/prompt_ablations.py): below also trains the patch conv.
    "vpt_shallow-below": ("vpt_shallow", {"prompt.location": "below"}, 2),
}
# Cases whose export may fold into the plain ViT (export.merging).
MERGEABLE = ("linear", "full", "partial-1", "bias", "lora", "ssf", "difffit", "ln_tune",
             "fact_tt", "fact_tk", "repadapter")
# Trainable parameters that provably stay at their initial value (vpt.md 1.9):
# with both adapter projections zero, only Up's bias ever gets a gradient.
STUCK = {"adapter-vpt_reference": r".*/adapter/(down/.*|up/kernel)"}


def _block_params(depth):
  """Parameters of `depth` pre-LN blocks: 2 LayerNorms, q/k/v/out, the MLP."""
  return depth * (4 * D + 4 * (D * D + D) + D * MLP + MLP + MLP * D + D)


def _vit_params(depth):
  """The whole backbone: patch embedding, CLS, position embedding, blocks, final norm."""
  return PATCH * PATCH * 3 * D + D + D + TOKENS * D + _block_params(depth) + 2 * D


def _biases(depth):
  """Every bias vector: patch embedding, per block LN0, q/k/v/out, LN1, MLP (M + D), final LN."""
  return D + depth * (D + 3 * D + D + D + MLP + D) + D


HEAD = D * CLASSES + CLASSES


def expected_trainable(case: str, depth: int) -> int:
  """The closed formula of each method's trainable parameter count."""
  formulas = {
      "linear": HEAD,
      "full": _vit_params(depth) + HEAD,
      "partial-1": _block_params(1) + 2 * D + HEAD,
      "partial-2": _block_params(2) + 2 * D + HEAD,
      "partial-4": _block_params(4) + 2 * D + HEAD,
      # 2 hidden layers: Dense (D x D + D) and BatchNorm scale and bias (2 D).
      "mlp-3": 2 * (D * D + D + 2 * D) + HEAD,
      "bias": _biases(depth) + HEAD,
      "adapter": depth * (2 * D * (D // REDUCTION) + D // REDUCTION + D) + HEAD,
      "sidetune": (3 * 3 * 3 * SIDE[0] + SIDE[0] + 3 * 3 * SIDE[0] * SIDE[1] + SIDE[1]
                   + SIDE[1] * D + 1 + HEAD),
      "vpt_shallow": M * D + HEAD,
      "vpt_deep": depth * M * D + HEAD,
      "vpt+bias": depth * M * D + _biases(depth) + HEAD,
      "cvpt": depth * M * D + HEAD,
      # 4 targets, each A (D x r) and B (r x D) (q/k/v: D = H x D/H outputs).
      "lora": depth * 4 * 2 * D * RANK + HEAD,
      "vfpt": depth * M * D + HEAD,
      "e2vpt": depth * M * D + depth * HEADS * KV * (D // HEADS) + HEAD,
      # A scale and a shift after q, k, v, out (D each), fc1 (MLP), fc2, 2 LayerNorms
      # per block, the patch embedding and the final norm.
      "ssf": 2 * (depth * (7 * D + MLP) + 2 * D) + HEAD,
      # Biases, LayerNorm scales (2 per block + final) and gamma1, gamma2 per block.
      "difffit": _biases(depth) + (2 * depth + 1) * D + 2 * depth * D + HEAD,
      "ln_tune": (2 * depth + 1) * 2 * D + HEAD,
      # U (D x r), V (r x D); TT per layer 4 r x r cores + fc1 r x (m r) + fc2 (m r) x r,
      # m = MLP / D; TK one r^3 core and FacTp r x (4 + 2 m) L.
      "fact_tt": 2 * D * RANK + depth * (4 + 2 * MLP // D) * RANK ** 2 + HEAD,
      "fact_tk": 2 * D * RANK + RANK * (4 + 2 * MLP // D) * depth + RANK ** 3 + HEAD,
      # Two adapters per block: down D x h + h, grouped up h x D / 2 + D (h = 4).
      "repadapter": 2 * depth * (D * 4 + 4 + 4 * D // 2 + D) + HEAD,
      # one query per block; the head reads D (1 + depth) features
      "vqt": depth * D + D * (1 + depth) * CLASSES + CLASSES,
      # prompt channels (H, W, M), their kernel (P, P, M, D), the patch conv (P, P, 3, D) + D
      "vpt_shallow-below": (IMAGE * IMAGE * M + PATCH * PATCH * M * D
                            + PATCH * PATCH * 3 * D + D + HEAD),
  }
  # Bottleneck adapters of width BOTTLENECK: Down D x b + b, Up b x D + D.
  bottleneck = 2 * D * BOTTLENECK + BOTTLENECK + D
  formulas.update(houlsby=depth * 2 * bottleneck + HEAD,
                  adaptformer=depth * (bottleneck + 2 * D) + HEAD,  # + its LayerNorm
                  adapter_plus=depth * (bottleneck + D) + HEAD,  # + the channel scale
                  # two bypasses per block, each a bottleneck plus a 3x3 b -> b conv
                  convpass=depth * 2 * (bottleneck + 9 * BOTTLENECK ** 2 + BOTTLENECK) + HEAD)
  formulas["adapter-vpt_reference"] = formulas["adapter"]
  return formulas[case]


def case_config(case: str):
  method, overrides, depth = CASES[case]
  return fixtures.method_config(
      method, f"test{depth}/{PATCH}" if depth != 2 else f"test/{PATCH}", IMAGE, num_prompts=M,
      **{"e2vpt.kv_prompts": KV, "lora.rank": RANK, "adapter.reduction": REDUCTION,
         "sidetune.widths": ",".join(map(str, SIDE)),
         **{f"{name}.bottleneck": BOTTLENECK for name in ("houlsby", "adaptformer",
                                                          "adapter_plus", "convpass")},
         **overrides})


@functools.cache
def backbone_file(depth: int, directory: str) -> str:
  """A tiny raw-layout ViT checkpoint of the given depth (no compile: random values)."""
  variant = f"test{depth}/{PATCH}" if depth != 2 else f"test/{PATCH}"
  params = fixtures.make_model_params(vit.VisionTransformer(num_classes=7, variant=variant),
                                      IMAGE, seed=depth)
  path = f"{directory}/backbone_depth{depth}.npz"
  fixtures.write_vit_raw_npz(params, path)
  return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return str(tmp_path_factory.mktemp("methods"))


_RUNS = {}


def trained(case: str, workspace: str) -> dict:
  """Builds, loads and trains a case for STEPS steps on one batch (cached per case)."""
  if case in _RUNS:
    return _RUNS[case]
  config = case_config(case)
  method = registry.get_method(config.method)
  spec = factory.model_spec(config)
  model = factory.build_model(spec, CLASSES)
  # Eager: the tiny model's ops compile once for all cases (a jit would compile
  # each case's whole init).
  variables = model.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
  path = backbone_file(CASES[case][2], workspace)
  params = factory.load_pretrained(variables["params"], spec, path)
  labels = freezing.label_params(params, factory.trainable_rules(config))
  optimizer = config.optim.name or method.optimizer
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8),
           "label": rng.integers(0, CLASSES, (8,)).astype(np.int32)}
  initial, state, losses = train_steps(
      model, params, labels, batch, optimizer=optimizer,
      learning_rate=LEARNING_RATES[optimizer], weight_decay=config.optim.weight_decay,
      normalization=MEAN_STD, batch_stats=variables.get("batch_stats"))
  _RUNS[case] = dict(config=config, method=method, spec=spec, model=model, labels=labels,
                     initial=initial, state=state, losses=losses, backbone=path, batch=batch)
  return _RUNS[case]


@pytest.mark.parametrize("case", CASES)
def test_only_the_intended_parameters_change(case, workspace):
  run = trained(case, workspace)
  flat_labels = trees.flatten(run["labels"])
  stuck = STUCK.get(case)
  assert_only_trainable_changed(
      trees.flatten(run["initial"]["params"]), trees.flatten(run["state"]["params"]),
      lambda path: flat_labels[path] == freezing.TRAIN
      and not (stuck and re.fullmatch(stuck, path)))
  if "batch_stats" in run["initial"]:  # BatchNorm running averages follow the batches
    for path, value in trees.flatten(run["initial"]["batch_stats"]).items():
      assert not np.array_equal(value, trees.flatten(run["state"]["batch_stats"])[path])


@pytest.mark.parametrize("case", CASES)
def test_trainable_count_matches_the_closed_formula(case, workspace):
  run = trained(case, workspace)
  trainable, _ = freezing.split(run["state"]["params"], run["labels"])
  assert freezing.count(trainable) == expected_trainable(case, CASES[case][2])
  # The parameters not in the backbone file are exactly the method's own.
  backbone = freezing.count(
      {p: v for p, v in trees.flatten(run["state"]["params"]).items()
       if not any(re.fullmatch(f, p) for f in run["method"].fresh_patterns)})
  assert backbone == _vit_params(CASES[case][2])


@pytest.mark.parametrize("case", CASES)
def test_loss_decreases(case, workspace):
  losses = trained(case, workspace)["losses"]
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("case", CASES)
def test_export_round_trip_gives_the_same_logits(case, workspace, tmp_path):
  run = trained(case, workspace)
  state = run["state"]
  directory = task_export.export_task(
      str(tmp_path / "export"), state["params"], run["labels"], spec=run["spec"],
      num_classes=CLASSES, class_names=None, normalization=MEAN_STD,
      backbone_path=run["backbone"], backbone_fingerprint=npz.fingerprint(run["backbone"]),
      init_seed=0, batch_stats=state.get("batch_stats"))
  model, variables, metadata = task_export.load_task_variables(directory)
  assert metadata["model"]["method"] == run["method"].name
  assert sorted(variables) == sorted(steps.model_variables(state))
  assert model == run["model"]
  images = normalization_lib.normalize_images(run["batch"]["image"], **MEAN_STD)
  # On device arrays, the eager ops compiled for earlier cases are reused.
  logits = [np.asarray(m.apply(jax.device_put(v), images)) for m, v in (
      (model, variables), (run["model"], steps.model_variables(state)))]
  np.testing.assert_array_equal(logits[0], logits[1])


@pytest.mark.parametrize("case", MERGEABLE)
def test_merged_export_is_a_plain_vit_with_the_same_logits(case, workspace, tmp_path):
  run = trained(case, workspace)
  directory = merging.export_merged(
      str(tmp_path / "merged"), run["state"]["params"], spec=run["spec"],
      num_classes=CLASSES, class_names=None, normalization=MEAN_STD, init_seed=0)
  model, params, metadata = task_export.load_task(directory, expected_method="linear")
  assert model.hooks == vit.VisionTransformer(num_classes=CLASSES).hooks  # no method left
  images = normalization_lib.normalize_images(run["batch"]["image"], **MEAN_STD)
  merged = np.asarray(model.apply({"params": jax.device_put(params)}, images))
  unmerged = np.asarray(run["model"].apply(
      jax.device_put(steps.model_variables(run["state"])), images))
  # The folded weights are the float64 sums rounded once to float32; over the
  # tiny model's 2 blocks that moves O(1) logits by ~1e-6, inside the 1e-5 the
  # issue asks for.
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
  assert metadata["merged_from"] == run["method"].name


def test_every_registered_method_is_covered():
  assert {CASES[c][0] for c in CASES} >= set(registry.METHODS) - {"mlp-2", "mlp-5", "mlp-9"}


def test_partial_k_deeper_than_the_backbone_is_refused():
  config = case_config("partial-4")
  config.model.variant = "test/4"
  with pytest.raises(ValueError, match="the model has 2"):
    factory.validate_spec(factory.model_spec(config))


def test_side_network_loads_its_own_checkpoint(workspace, tmp_path):
  config = case_config("sidetune")
  spec = factory.model_spec(config)
  model = factory.build_model(spec, CLASSES)
  shapes = fixtures.param_shapes(model, IMAGE)
  side_source = fixtures.randomize(shapes, seed=11)
  sidetune.save_side_network(side_source, str(tmp_path / "side.npz"))
  assert sorted(npz.read_npz(str(tmp_path / "side.npz"))) == [
      "conv_0/bias", "conv_0/kernel", "conv_1/bias", "conv_1/kernel"]
  init = fixtures.randomize(shapes, seed=12)
  loaded = factory.load_pretrained(init, spec, backbone_file(2, workspace),
                                   side_checkpoint=str(tmp_path / "side.npz"))
  for path, value in trees.flatten(loaded["side"]).items():
    source = side_source if path.startswith("conv_") else init
    np.testing.assert_array_equal(value, trees.flatten(source["side"])[path], err_msg=path)
  bad = {"conv_0/kernel": np.zeros((3, 3, 3, 5), np.float32)}
  npz.save_npz(bad, str(tmp_path / "bad.npz"))
  with pytest.raises(npz.CheckpointMismatchError, match="conv_1/kernel"):
    sidetune.load_side_network(init, str(tmp_path / "bad.npz"))
