"""The evaluation stream: padded, masked batches, every example once across processes."""

import numpy as np
import pytest

import data_fixtures
from vpt_jax.data import eval_stream
from vpt_jax.data import source_protocols
from vpt_jax.data import training_stream

_digest = data_fixtures.digest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return data_fixtures.prepared_tfds_dir(tmp_path_factory)


def test_eval_batches_pad_and_mask(data_dir):
  # 10 test examples in batches of 4: 4 + 4 + 2 real rows.
  source = source_protocols.ImageSource("vpt_sprites/tiny", "test", data_dir, label_key="count")
  batches = list(eval_stream.eval_batches(source, image_size=16, local_batch=4))
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["mask"].dtype == bool
  assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
  assert not batches[-1]["image"][2:].any()
  # The real rows are the split's examples, once each, in stored order.
  images, labels = training_stream.load_split_arrays(source, image_size=16)
  real = np.concatenate([b["image"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(real, images)
  np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                labels)


def test_a_reused_eval_dataset_streams_the_split_every_time(data_dir):
  # A run builds its evaluation pipeline once and iterates it at every evaluation.
  source = source_protocols.ImageSource("vpt_sprites/tiny", "test", data_dir, label_key="count")
  images, labels = training_stream.load_split_arrays(source, image_size=16)
  dataset = eval_stream.eval_dataset(source, image_size=16, local_batch=4)
  for _ in range(3):
    batches = list(eval_stream.eval_batches(source, image_size=16, local_batch=4, dataset=dataset))
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]),
                                  images)
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                  labels)


def test_eval_batches_two_processes(data_dir):
  # 7 examples over 2 processes: shares of 4 and 3; batches of 3 -> 2 batches each.
  source = source_protocols.ImageSource("vpt_sprites/tiny", "train[:7]", data_dir,
                                        label_key="shape")
  per_process = [list(eval_stream.eval_batches(source, image_size=32, local_batch=3,
                                               process_index=p, process_count=2))
                 for p in range(2)]
  assert [len(b) for b in per_process] == [2, 2]
  assert eval_stream.num_eval_batches(source, local_batch=3, process_count=2) == 2
  masks = [[int(b["mask"].sum()) for b in batches] for batches in per_process]
  assert masks == [[3, 1], [3, 0]]
  seen = [_digest(b["image"][i]) for batches in per_process for b in batches
          for i in np.nonzero(b["mask"])[0]]
  images, _ = training_stream.load_split_arrays(source, image_size=32)
  assert len(seen) == 7 and sorted(seen) == sorted(_digest(im) for im in images)
