"""The README's table of refusals ("Bad input fails before compute") names every config
field that a refusal test sets, so a new refusal cannot go undocumented; and each kind
of refusal outside the config checks that issue 15 added has its row."""

import os
import re

import pytest

from tests.training import test_config_checks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Refusals raised outside config_checks (their tests are named): a fragment of each row.
OTHER_REFUSALS = {
    "tests/checkpoints/test_train_state.py (fewer classes)": "does not fit the model",
    "tests/checkpoints/test_train_state.py (no readable checkpoint)": "no checkpoint in",
    "tests/checkpoints/test_train_state.py (a failing disk)": "could not save checkpoint",
    "tests/export/test_task_export.py (a broken export)": "a broken export",
    "tests/checkpoints/test_npz.py (an unreachable remote checkpoint)": "cannot reach gs://",
    "tests/checkpoints/test_npz.py (an unreadable file)": "exists but cannot be read",
    "tests/data/test_files.py (a data.path that is a file)": "is a file, not a folder",
    "tests/data/test_files.py (a corrupt image)": "corrupt image in your folder",
    "tests/training/test_workdir_lock.py (a busy workdir)": "in use by another run",
}


def _refusal_table() -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  start = readme.index("**Bad input fails before compute**")
  end = readme.index("On the command line a user error is one line", start)
  return readme[start:end]


def _fields(overrides: dict) -> list:
  return [key for key in overrides if key != "method"]  # the method is the setting, not the fault


@pytest.mark.parametrize("case", sorted(test_config_checks.REFUSED_VALUES))
def test_every_refused_config_field_is_named_in_the_readme(case):
  overrides, _ = test_config_checks.REFUSED_VALUES[case]
  table = _refusal_table()
  # The field the refusal is about is the last override (e.g. epochs=0 with warmup 0).
  field = _fields(overrides)[-1] if case != "zero_epochs" else "optim.epochs"
  assert re.search(rf"`{re.escape(field)}[` =<]", table), f"{case}: {field} is not in the table"


@pytest.mark.parametrize("where", sorted(OTHER_REFUSALS))
def test_every_other_refusal_has_its_row(where):
  assert OTHER_REFUSALS[where] in _refusal_table(), where
