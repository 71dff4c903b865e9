"""NOAH's few-shot grid with a stubbed run function (plan, configs, summaries, resume,
shards, refusals), the report's sections, and one tiny real run with its targets."""

import json
import os

import numpy as np
import pytest

import checkpoint_fixtures
from configs import few_shot_protocol as few_shot_config
from vpt_jax import cli
from vpt_jax import errors
from vpt_jax.data import imagenet_shifts
from vpt_jax.protocol import few_shot_protocol
from vpt_jax.protocol import report


def config(arg="methods=vpt_deep+linear,datasets=oxford_pets,shots=1+4,seeds=0+1", **overrides):
  return checkpoint_fixtures.override(few_shot_config.get_config(arg), overrides)


class Stub:
  """Test top-1 = shots / 100 + draw / 500 (+ 0.1 for linear); targets 0.2 + draw / 100."""

  def __init__(self):
    self.calls = []

  def __call__(self, run_cfg, run_dir):
    self.calls.append(run_cfg)
    top1 = (run_cfg.data.shots / 100 + run_cfg.data.shots_seed / 500
            + (0.1 if run_cfg.method == "linear" else 0.0))
    return {"test": {"top1": top1, "count": 10}}

  @staticmethod
  def targets(run_cfg, run_dir, targets):
    return {t.name: {"top1": 0.2 + run_cfg.data.shots_seed / 100, "top1_1000way": 0.1,
                     "count": 5} for t in targets}


def test_grid_runs_every_method_shot_and_draw_with_noahs_settings(tmp_path):
  stub = Stub()
  summaries = few_shot_protocol.run_protocol(config(), str(tmp_path), stub)
  assert [(c.method, c.data.shots, c.data.shots_seed) for c in stub.calls] == [
      (m, n, s) for m in ("vpt_deep", "linear") for n in (1, 4) for s in (0, 1)]
  first = stub.calls[0]
  assert first.data.task == "fewshot/oxford_pets" and first.data.path == ""
  assert (first.data.train_split, first.data.eval_split, first.data.test_split) == (
      "train", "", "test")
  assert first.optim.name == "adamw" and first.optim.batch_size == 64
  assert first.optim.base_lr * first.optim.batch_size / 256 == pytest.approx(0.005)
  assert (first.optim.weight_decay, first.optim.epochs, first.optim.warmup_epochs) == (
      1e-4, 100, 10)
  assert {c.seed for c in stub.calls} == {42}  # the draw varies, the training seed not
  linear = summaries[1]
  assert linear["method"] == "linear" and linear["complete"]
  four = linear["shots"]["4"]
  assert four["seeds"] == {"0": pytest.approx(0.14), "1": pytest.approx(0.142)}
  assert four["mean"] == pytest.approx(0.141) and four["std"] == pytest.approx(0.001)
  path = tmp_path / "fewshot" / "oxford_pets" / "linear" / "few_shot.json"
  assert json.loads(path.read_text()) == linear and linear["shots_from"] == "TFDS draw"
  run = json.loads((tmp_path / "fewshot/oxford_pets/vpt_deep/shots4/seed1/run.json").read_text())
  assert run["status"] == "finished" and run["spec"]["shots"] == 4
  # A rerun runs nothing; a changed setting is refused with the fix.
  again = Stub()
  few_shot_protocol.run_protocol(config(), str(tmp_path), again, write_report=False)
  assert again.calls == []
  with pytest.raises(errors.UserError, match="different config.*new --workdir"):
    few_shot_protocol.run_protocol(config(**{"optim.weight_decay": 0.0}), str(tmp_path),
                                   Stub(), write_report=False)


def test_shards_split_the_runs(tmp_path):
  stubs = [Stub(), Stub()]
  for i, stub in enumerate(stubs):
    few_shot_protocol.run_protocol(config(**{"few_shot.shard": f"{i}/2"}), str(tmp_path),
                                   stub, write_report=False)
  assert [len(s.calls) for s in stubs] == [4, 4]
  summary = json.loads((tmp_path / "fewshot/oxford_pets/vpt_deep/few_shot.json").read_text())
  assert summary["complete"]  # the second job saw the first job's runs


@pytest.mark.parametrize("overrides,problem", [
    ({"few_shot.shots": (3,)}, "few_shot.shots=3 is not one of NOAH's shot counts"),
    ({"few_shot.seeds": ()}, "must be non-empty"),
    ({"few_shot.methods": "vpt_deeep"}, "vpt_deeep"),
    ({"few_shot.datasets": "pets+birds"}, "Unknown few-shot dataset 'birds'"),
    ({"few_shot.targets": "all"}, "set --config.few_shot.datasets=imagenet"),
    ({"few_shot.targets": "imagenet_c", "few_shot.datasets": "imagenet"}, "imagenet_c"),
    ({"data.path": "/nowhere", "few_shot.datasets": "fgvc"},
     "/nowhere/fgvc-aircraft/annotations is missing"),
    ({"data.path": "/nowhere"}, "/nowhere/annotations is missing"),
    ({"few_shot.datasets": "pets+aircraft"}, "FGVC-Aircraft has no TFDS builder: set data.path"),
])
def test_bad_grids_are_refused_before_any_run(overrides, problem, tmp_path):
  stub = Stub()
  with pytest.raises(errors.UserError, match=problem) as error:
    few_shot_protocol.run_protocol(config(**overrides), str(tmp_path), stub)
  assert "\n" not in str(error.value) and stub.calls == []


def test_missing_noah_lists_are_refused_before_any_run(tmp_path):
  annotations = tmp_path / "annotations"
  annotations.mkdir()
  for name in ("test_meta.list", "train_meta.list.num_shot_1.seed_0",
               "train_meta.list.num_shot_1.seed_1", "train_meta.list.num_shot_4.seed_0"):
    (annotations / name).write_text("a.jpg 0\n")
  stub = Stub()
  with pytest.raises(errors.MissingInputError,
                     match=r"num_shot_4\.seed_1 is missing \(1 of the grid's 5 lists\); "
                           "copy data/few-shot/oxford-pets/annotations/"):
    few_shot_protocol.run_protocol(config(**{"data.path": str(tmp_path)}), str(tmp_path / "w"),
                                   stub)
  assert stub.calls == []


def test_report_has_the_shots_table_curve_and_target_table(tmp_path):
  stub = Stub()
  few_shot_protocol.run_protocol(config(), str(tmp_path / "fgvc"), stub, write_report=False)
  few_shot_protocol.run_protocol(
      config("methods=lora,datasets=imagenet,shots=16,seeds=0+2,targets=all"),
      str(tmp_path / "dg"), stub, target_fn=Stub.targets, write_report=False)
  text = open(report.write_report(str(tmp_path))).read()
  assert "### Oxford Pets (shots: TFDS draw)" in text and "| shots | linear | vpt_deep |" in text
  assert "| 4 | 14.1 ± 0.1 | 4.1 ± 0.1 |" in text  # (14.0, 14.2) and (4.0, 4.2)
  assert (tmp_path / "report" / "few_shot_curves.png").stat().st_size > 0
  # source (16.0, 16.4): 16.2 ± 0.2; targets 20 and 22 -> 21.0 ± 1.0, A/R with NOAH's 1000-way 10.0
  row = ("| lora | 16 | 16.2 ± 0.2 | 21.0 ± 1.0 | 21.0 ± 1.0 | 21.0 ± 1.0 (1000-way 10.0) "
         "| 21.0 ± 1.0 (1000-way 10.0) | 21.0 |")
  assert row in text
  rows = (tmp_path / "report" / "few_shot.csv").read_text().splitlines()
  assert "oxford_pets,linear,4,test,14.10,0.10,2," in rows
  assert "imagenet,lora,16,imagenet_a,21.00,1.00,2,10.00" in rows


# ----------------------------------------------------------- one tiny real run

def _noah_imagenet(root, labels):
  """A NOAH-layout ImageNet folder with one 1-shot line per label."""
  import data_fixtures  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, "annotations"))
  lines = []
  for i, label in enumerate(labels):
    data_fixtures.write_image(os.path.join(root, "train", f"n{label}", f"{i}.png"), 40 * i,
                              size=(16, 16))
    lines.append(f"n{label}/{i}.png {label}\n")
  with open(os.path.join(root, "annotations", "train_meta.list.num_shot_1.seed_0"), "w") as f:
    f.writelines(lines)
  with open(os.path.join(root, "annotations", "val_meta.list"), "w") as f:
    f.writelines(lines)  # tested on the training images: only the pipeline matters here
  os.symlink(os.path.join(root, "train"), os.path.join(root, "val"))


def test_tiny_real_run_scores_its_export_on_a_mocked_target(backbone, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import data_fixtures  # pylint: disable=g-import-not-at-top
  classes = imagenet_shifts.IMAGENET_R_CLASSES
  _noah_imagenet(str(tmp_path / "imagenet"), [classes[0], classes[5], classes[9]])
  data_dir = str(tmp_path / "tfds")
  data_fixtures.inject_split_sizes(data_dir, "imagenet_r:0.2.0", {"test": 3})
  cfg = config(f"methods=linear,datasets=imagenet,shots=1,seeds=0,targets=imagenet_r,"
               f"path={tmp_path / 'imagenet'},data_dir={data_dir},checkpoint={backbone}",
               **{"model.variant": "test/4", "model.image_size": 32, "optim.epochs": 1,
                  "optim.warmup_epochs": 0, "optim.batch_size": 3, "eval.batch_size": 2,
                  "eval.costs": False})
  images = [np.full((20, 24, 3), 30 * i, np.uint8) for i in range(3)]
  examples = [{"image": im, "label": np.int64(c), "file_name": "x"}
              for im, c in zip(images, (classes[0], classes[7], classes[199]))]
  target_ds = lambda *a, **k: tf.data.Dataset.from_generator(  # noqa: E731
      lambda: iter(examples), output_signature={
          "image": tf.TensorSpec([None, None, 3], tf.uint8),
          "label": tf.TensorSpec([], tf.int64), "file_name": tf.TensorSpec([], tf.string)})
  with tfds.testing.mock_data(num_examples=3, data_dir=data_dir, as_dataset_fn=target_ds):
    summaries = cli.run(cfg, str(tmp_path / "work"))
  run_dir = tmp_path / "work/fewshot/imagenet/linear/shots1/seed0"
  record = json.loads((run_dir / "run.json").read_text())
  scores = record["results"]["targets"]["imagenet_r"]
  with np.load(run_dir / "predictions_imagenet_r.npz") as saved:
    logits, labels = saved["logits"], saved["labels"]
  assert logits.shape == (3, 1000) and labels.tolist() == [classes[0], classes[7], classes[199]]
  subset = np.asarray(classes)
  restricted = subset[np.argmax(logits.astype(np.float32)[:, subset], axis=1)]
  assert scores["count"] == 3
  assert scores["top1"] == pytest.approx(np.mean(restricted == labels))
  assert scores["top1_1000way"] == pytest.approx(np.mean(np.argmax(logits, 1) == labels))
  assert summaries[0]["shots"]["1"]["targets"]["imagenet_r"]["num_seeds"] == 1
  assert "## Domain generalisation" in (tmp_path / "work/report/report.md").read_text()
