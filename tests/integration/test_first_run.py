"""Issue 15 section 5: a newcomer's first run on their own class folder works with the
defaults. run.py trains on a fresh folder given only --config.data.path, the model
flags and a backbone (the splits come from the folder, printed), then --mode predict
reads the export's recorded backbone, not the config's default gs:// ViT-B/16."""

import json
import os
import subprocess
import sys

import data_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_then_predict_on_a_fresh_class_folder_with_the_defaults(backbone, tmp_path):
  for label, name in enumerate(("cat", "dog")):
    for i in range(6):
      data_fixtures.write_image(str(tmp_path / "pets" / name / f"{i}.png"),
                                100 * label + 15 * i, size=(8, 8))
  model = "--config=configs/vpt.py:method=vpt_deep,num_prompts=2,variant=test/4,image_size=32"
  data = ["--config.data.task=folder", f"--config.data.path={tmp_path / 'pets'}",
          f"--workdir={tmp_path / 'run'}"]
  train = subprocess.run([sys.executable, "run.py", f"{model},checkpoint={backbone}", *data],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  assert ("data splits from the folder layout: train_split='all[:80%]', eval_split='', "
          "test_split='all[80%:]'") in train.stdout
  with open(tmp_path / "run" / "results.json") as f:
    assert json.load(f)["test"]["count"] == 2  # 20% of 12 images, rounded as TFDS does

  images = [str(tmp_path / "pets" / "cat" / "0.png"), str(tmp_path / "pets" / "dog" / "1.png")]
  predict = subprocess.run(  # no checkpoint= : the config's default is the gs:// ViT-B/16
      [sys.executable, "run.py", model, *data, "--mode=predict",
       f"--config.predict.images={','.join(images)}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert predict.returncode == 0, predict.stderr[-3000:]
  rows = [json.loads(line) for line in predict.stdout.splitlines() if line.startswith("{")]
  assert [row["file"] for row in rows] == images
  assert all(row["class"] in ("cat", "dog") for row in rows)
