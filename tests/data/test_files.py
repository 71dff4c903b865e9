"""File-based datasets (VPT's FGVC JSON splits, the extracted VTAB-1k folder,
class folders) and unreadable files, on small files the tests write."""

import json
import os

import numpy as np
import pytest

import data_fixtures
from vpt_jax import errors
from vpt_jax.data import eval_stream
from vpt_jax.data import files
from vpt_jax.data import source_protocols
from vpt_jax.data import sources
from vpt_jax.data import training_stream

_write_image = data_fixtures.write_image
_data = data_fixtures.data_config


def _load(source, image_size=4):
  return training_stream.load_split_arrays(source, image_size=image_size)


# ----------------------------------------------------------------- VPT JSON splits

@pytest.fixture()
def cub(tmp_path):
  """A CUB-like folder: images/ and split files with class ids 5, 12, 30."""
  root = str(tmp_path / "CUB")
  splits = {"train": {"001.a/1.png": 5, "012.b/2.png": 12, "001.a/3.png": 5,
                      "030.c/4.png": 30},
            "val": {"012.b/5.png": 12, "001.a/6.png": 5, "030.c/7.png": 30},
            "test": {"030.c/8.png": 30, "001.a/9.png": 5}}
  for split, annotations in splits.items():
    for i, relative in enumerate(annotations):
      _write_image(os.path.join(root, "images", relative), 10 * i + 1)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{split}.json"), "w") as f:
      json.dump(annotations, f)
  return root


def test_vpt_json_splits_remap_ids_in_file_order(cub):
  source = sources.make_source(_data(task="fgvc/cub", path=cub), "train")
  assert isinstance(source, files.FileSource)
  assert source_protocols.num_classes(source) == 200  # the dataset's, from the registry
  images, labels = _load(source, image_size=6)
  assert labels.tolist() == [0, 1, 0, 2]  # ids 5, 12, 5, 30 in the file's order
  assert images.shape == (4, 6, 6, 3) and images.dtype == np.uint8
  assert images[1, 0, 0].tolist() == [11, 0, 244]  # the second file's pixels
  both = sources.make_source(_data(task="fgvc/cub", path=cub), "train+val[:1]")
  assert _load(both)[1].tolist() == [0, 1, 0, 2, 1]


def test_a_split_missing_a_class_keeps_the_shared_mapping(cub, capsys):
  # test.json lacks id 12: the reference's per-split remapping would turn 30
  # into 1 there; the ids of all split files keep it 2 (with a warning).
  source = sources.make_source(_data(task="fgvc/cub", path=cub), "test")
  assert _load(source)[1].tolist() == [2, 0]
  assert "2 of the 3 class ids" in capsys.readouterr().err


def test_json_folder_without_split_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="train.json"):
    sources.make_source(_data(task="json", path=str(tmp_path)), "train")


# ----------------------------------------------------------------- VTAB-1k folders

@pytest.fixture()
def vtab1k(tmp_path):
  """vtab-1k/smallnorb_azi (NOAH's folder name) with the four lists."""
  root = tmp_path / "vtab-1k"
  task = root / "smallnorb_azi"
  lines = {"train800": [("images/a.png", 3), ("images/b.png", 17)],
           "val200": [("images/c.png", 0)],
           "test": [("images/d.png", 5), ("images/e.png", 9), ("images/f.png", 1)]}
  lines["train800val200"] = lines["train800"] + lines["val200"]
  for i, name in enumerate("abcdef"):
    _write_image(str(task / "images" / f"{name}.png"), 40 * i)
  for split, rows in lines.items():
    (task / f"{split}.txt").write_text("".join(f"{p} {l}\n" for p, l in rows))
  return str(root)


def test_vtab1k_folder_by_task_name(vtab1k):
  data = _data(task="vtab/smallnorb_azim", path=vtab1k)
  source = sources.make_source(data, "train800val200")
  assert source_protocols.num_classes(source) == 18  # the registry's, not the lists'
  images, labels = _load(source)
  assert labels.tolist() == [3, 17, 0] and images.shape == (3, 4, 4, 3)
  assert source_protocols.num_examples(sources.make_source(data, "test")) == 3
  assert _load(sources.make_source(data, "test[1:]"))[1].tolist() == [9, 1]


def test_vtab1k_folder_errors_name_the_file(vtab1k, capsys):
  task_dir = os.path.join(vtab1k, "smallnorb_azi")
  with open(os.path.join(task_dir, "val200.txt"), "a") as f:
    f.write("images/a.png 3\n")
  sources.make_source(_data(task="vtab/smallnorb_azim", path=vtab1k), "train800val200")
  assert "train800val200.txt is not train800.txt + val200.txt" in capsys.readouterr().err
  with open(os.path.join(task_dir, "test.txt"), "a") as f:
    f.write("images/a.png 18\n")
  with pytest.raises(ValueError, match=r"label 18 of .*a.png is outside \[0, 18\)"):
    sources.make_source(_data(task="vtab/smallnorb_azim", path=vtab1k), "test")
  with open(os.path.join(task_dir, "test.txt"), "a") as f:
    f.write("no-label-here\n")
  with pytest.raises(ValueError, match=r"test.txt:5: expected 'relative/path label'"):
    sources.make_source(_data(task="vtab/smallnorb_azim", path=vtab1k), "test")
  with pytest.raises(FileNotFoundError, match="train800.txt"):
    sources.make_source(_data(task="vtab/dmlab", path=vtab1k), "test")


# ----------------------------------------------------------------- class folders

def test_image_folder_flat_layout(tmp_path):
  root = tmp_path / "pets"
  for cls, count in (("dog", 3), ("cat", 4)):
    for i in range(count):
      _write_image(str(root / cls / f"{i}.png"), 20 * i + (cls == "dog"))
  (root / "cat" / "notes.txt").write_text("not an image")
  source = sources.make_source(_data(task="folder", path=str(root)), "all")
  assert source_protocols.class_names(source) == ["cat", "dog"]
  assert source_protocols.num_classes(source) == 2
  images, labels = _load(source)
  assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1]
  # The hashed order mixes classes, and "all[:50%]" + "all[50%:]" is everything.
  assert labels.tolist() != sorted(labels.tolist())
  halves = [_load(sources.make_source(_data(task="folder", path=str(root)), s))[0]
            for s in ("all[:50%]", "all[50%:]")]
  np.testing.assert_array_equal(np.concatenate(halves), images)


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"),
                                           ("a file", "is a file, not a folder")])
def test_an_image_folder_that_is_not_a_folder_says_which(tmp_path, kind, message):
  root = tmp_path / "pets"
  if kind == "a file":
    root.write_text("not a folder")
  with pytest.raises(errors.MissingInputError, match=f"image folder {root} {message}; set "
                                                     "--config.data.path"):
    sources.make_source(_data(task="folder", path=str(root)), "all")


def test_image_folder_split_layout_shares_class_ids(tmp_path):
  root = tmp_path / "data"
  for split, classes in (("train", ("b", "c")), ("test", ("a", "b", "c"))):
    for cls in classes:
      _write_image(str(root / split / cls / "x.png"), 7)
  train = sources.make_source(_data(task="folder", path=str(root)), "train")
  test = sources.make_source(_data(task="folder", path=str(root)), "test")
  assert (source_protocols.class_names(train) == source_protocols.class_names(test)
          == ["a", "b", "c"])
  assert sorted(_load(train)[1].tolist()) == [1, 2]
  with pytest.raises(ValueError, match="Unknown split 'val'"):
    sources.make_source(_data(task="folder", path=str(root)), "val")
  with pytest.raises(ValueError, match="num_classes=3"):
    sources.make_source(_data(task="folder", path=str(root), num_classes=4), "train")


def test_select_parses_tfds_style_splits():
  sizes = {"train": 10, "val": 4}
  assert files.select("train[:30%]+val[-1:]", sizes) == [("train", 0, 3), ("val", 3, 4)]
  assert files.select("train[8:20]", sizes) == [("train", 8, 10)]
  with pytest.raises(ValueError, match="Cannot parse"):
    files.select("train[1:2:3]", sizes)


# ----------------------------------------------------------------- unreadable files

@pytest.fixture()
def with_corrupt(tmp_path):
  root = tmp_path / "corrupt"
  for i in range(5):
    _write_image(str(root / "a" / f"{i}.png"), 30 * i)
  (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  return str(root)


def test_a_corrupt_image_is_named(with_corrupt):
  source = sources.make_source(_data(task="folder", path=with_corrupt), "all")
  with pytest.raises(errors.UserError,
                     match=r"^cannot read or decode image \S*broken.jpg in image folder .*"
                           r"skip_corrupt=true") as error:
    _load(source)
  assert "\n" not in str(error.value)  # not TensorFlow's node dump


def test_skipping_corrupt_images_reports_the_count(with_corrupt, capfd):
  data = _data(task="folder", path=with_corrupt, skip_corrupt=True)
  images, _ = _load(sources.make_source(data, "all"))
  assert len(images) == 5
  err = capfd.readouterr().err  # tf.print writes to the file descriptor
  assert "skipped 1 unreadable image(s) of 6" in err and "broken.jpg" in err
  # Evaluation pads what was skipped and counts only real images.
  batches = list(eval_stream.eval_batches(sources.make_source(data, "all"), image_size=4,
                                          local_batch=4))
  assert sum(int(b["mask"].sum()) for b in batches) == 5 and len(batches) == 2


def test_file_source_shares_cover_every_image_once(tmp_path):
  root = tmp_path / "shares"
  for i in range(7):
    _write_image(str(root / f"c{i % 2}" / f"{i}.png"), 30 * i)
  source = sources.make_source(_data(task="folder", path=str(root)), "all")
  seen = []
  for process in range(3):
    for batch in eval_stream.eval_batches(source, image_size=4, local_batch=2,
                                          process_index=process, process_count=3):
      seen += [b.tobytes() for b in batch["image"][batch["mask"]]]
  assert len(seen) == 7 and sorted(seen) == sorted(i.tobytes() for i in _load(source)[0])


# ----------------------------------------------------------------- FGVC preprocessing from files

def test_crop_mode_cache_and_eval_from_files(cub):
  data = _data(task="fgvc/cub", path=cub)
  images, labels = training_stream.load_train_set(sources.make_source(data, "train"), image_size=4,
                                                  preprocess="resize_crop_flip")
  # 6 x 5 images, shorter side -> 4 * 256 // 224 = 4: 4 x int(4 * 6 / 5) = 4 x 4.
  assert [im.shape for im in images] == [(4, 4, 3)] * 4 and labels.tolist() == [0, 1, 0, 2]
  batch = next(eval_stream.eval_batches(sources.make_source(data, "val"), image_size=3,
                                        local_batch=4, preprocess="resize_crop_flip"))
  assert batch["image"].shape == (4, 3, 3, 3) and batch["mask"].sum() == 3
