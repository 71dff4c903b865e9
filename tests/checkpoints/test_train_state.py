"""Training checkpoints: a failing disk keeps the previous save; a damaged newest save is
set aside and the run resumes from the one before; a save that no longer fits the model
(the dataset gained a class) is refused in one line naming the head's shapes."""

import errno
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vpt_jax.checkpoints import train_state as ckpt_lib

LABELS = {"head": {"kernel": "train", "bias": "train"}, "cls": "frozen"}


def _state(step, value, classes=3):
  """A tiny trainer state whose trainable leaves and optimizer state all equal ``value``."""
  return {"step": jnp.array(step, jnp.int32),
          "params": {"head": {"kernel": jnp.full((2, classes), value),
                              "bias": jnp.full((classes,), value)},
                     "cls": jnp.ones(2)},
          "opt_state": {"mu": jnp.full((classes,), value)}}


def _saved(directory, steps, keep=10):
  """A manager holding ``steps``, step s with every trainable value s (all writes done)."""
  manager = ckpt_lib.open_manager(str(directory), keep=keep, every_steps=1)
  for step in steps:
    ckpt_lib.save(manager, _state(step, float(step)), LABELS)
    ckpt_lib.wait_until_saved(manager)
  return manager


def _files(directory):
  return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]


def _truncate_arrays(step_dir):
  """Halves every array chunk file of a step (what a disk that filled up mid-copy leaves)."""
  chunks = [path for path in _files(step_dir) if f"{os.sep}d{os.sep}" in path]
  assert chunks
  for path in chunks:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, "default", "_METADATA"), "w") as f:
    f.write("\x00garbage")


def _empty_every_file(step_dir):
  for path in _files(step_dir):
    open(path, "w").close()


@pytest.mark.parametrize("damage", [_truncate_arrays, _garble_metadata, _empty_every_file])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
    tmp_path, damage):
  manager = _saved(tmp_path / "checkpoints", [1, 2, 3])
  damage(tmp_path / "checkpoints" / "3")
  warnings = []
  restored = ckpt_lib.restore_latest(manager, _state(0, 0.0), LABELS, warn=warnings.append)
  # Step 2's values (every trainable value 2.0), not step 3's and not the fresh state's.
  assert int(restored["step"]) == 2
  np.testing.assert_array_equal(restored["params"]["head"]["kernel"], np.full((2, 3), 2.0))
  np.testing.assert_array_equal(restored["opt_state"]["mu"], np.full(3, 2.0))
  np.testing.assert_array_equal(restored["params"]["cls"], np.ones(2))  # frozen: from state
  warning, = warnings
  assert "checkpoint step 3 (" in warning and "resuming from step 2" in warning, warning
  assert "\n" not in warning
  # Out of orbax's view: the next save of step 3 is a real one, and it restores.
  assert (tmp_path / "checkpoints" / f"3{ckpt_lib.UNREADABLE_SUFFIX}").is_dir()
  assert manager.latest_step() == 2
  assert ckpt_lib.save(manager, _state(3, 7.0), LABELS)
  ckpt_lib.wait_until_saved(manager)
  again = ckpt_lib.restore_latest(manager, _state(0, 0.0), LABELS, warn=warnings.append)
  assert int(again["step"]) == 3 and float(again["params"]["head"]["bias"][0]) == 7.0
  assert len(warnings) == 1
  manager.close()


def test_no_readable_checkpoint_is_refused_naming_each(tmp_path):
  manager = _saved(tmp_path / "checkpoints", [1, 2])
  for step in (1, 2):
    _garble_metadata(tmp_path / "checkpoints" / str(step))
  with pytest.raises(ckpt_lib.TrainStateError,
                     match=r"no checkpoint in .*checkpoints can be read \(step 2 \(.*\), "
                           r"step 1 \(.*\)\); .*new --workdir"):
    ckpt_lib.restore_latest(manager, _state(0, 0.0), LABELS)
  manager.close()


def test_a_checkpoint_of_fewer_classes_is_refused_naming_the_head_shapes(tmp_path):
  manager = _saved(tmp_path / "checkpoints", [1, 2])
  with pytest.raises(ckpt_lib.TrainStateError,
                     match=r"checkpoint step 2 in .* does not fit the model: "
                           r"trainable/head/bias is \(3,\) there but \(4,\) in the model "
                           r"\(the data's class count .*new --workdir") as error:
    ckpt_lib.restore_latest(manager, _state(0, 0.0, classes=4), LABELS)
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # nothing set aside
  manager.close()


def _disk_full_while_writing(monkeypatch):
  """The array writer fails after its files are started, as a full disk would."""
  original = ocp.StandardCheckpointHandler.async_save

  async def failing(self, directory, *args, **kwargs):
    for future in await original(self, directory, *args, **kwargs) or []:
      future.result()  # the files are written; then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)


def _disk_full_at_the_commit(monkeypatch):
  """Every file is written but the commit (the rename of step 2's folder) fails."""
  original = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

  async def failing(self, *args, **kwargs):
    if self.get_final().name == "2":
      raise OSError(errno.ENOSPC, "No space left on device", str(self.get_final()))
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", failing)


@pytest.mark.parametrize("inject", [_disk_full_while_writing, _disk_full_at_the_commit])
def test_a_failing_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                    inject):
  manager = _saved(tmp_path / "checkpoints", [1], keep=1)  # keep=1: step 2 would replace 1
  inject(monkeypatch)
  with pytest.raises(ckpt_lib.TrainStateError,
                     match=r"could not save .* No space left on device.*the previous "
                           r"checkpoint \(step 1\) is intact"):
    ckpt_lib.save(manager, _state(2, 2.0), LABELS)
    ckpt_lib.wait_until_saved(manager)
  manager.close()
  monkeypatch.undo()
  manager = ckpt_lib.open_manager(str(tmp_path / "checkpoints"), keep=1, every_steps=1)
  assert manager.all_steps() == [1]
  restored = ckpt_lib.restore_latest(manager, _state(0, 0.0), LABELS)
  np.testing.assert_array_equal(restored["params"]["head"]["kernel"], np.full((2, 3), 1.0))
  manager.close()
