"""Every preset is listed by `python -m configs`, one line each, and every listed preset
builds; a name that is not listed is refused."""

import subprocess
import sys

import pytest

from configs import __main__ as listing

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_every_listed_preset_builds_and_others_are_refused():
  for name, table in listing.presets().items():
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    assert table, name
    for preset, summary in table.items():
      assert summary and "\n" not in summary
      assert module.get_config(preset).model.name  # Builds, with a model.
    with pytest.raises(ValueError, match="allowed"):
      module.get_config("no_such_preset")


def test_the_listing_prints_one_line_per_preset():
  out = subprocess.run([sys.executable, "-m", "configs"], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  expected = [f"configs/{name}.py:{preset}" for name, table in listing.presets().items()
              for preset in table]
  assert [line.split()[0] for line in out] == expected
  assert len(expected) >= 25
