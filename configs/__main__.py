"""Lists every config file's presets, one line each:

    uv run python -m configs

Each is run as `uv run launch.py --config configs/FILE.py:PRESET --workdir runs/NAME`
(no preset: the file's default, its first).
"""

import importlib

FILES = ("vit", "perceiver", "eanet", "cct", "swin", "mobilevit")


def presets() -> dict[str, dict[str, str]]:
  """config file -> {preset: what it is}."""
  return {name: importlib.import_module(f"configs.{name}").PRESETS for name in FILES}


def main() -> None:
  for name, table in presets().items():
    for preset, summary in table.items():
      print(f"{f'configs/{name}.py:{preset}':<32} {summary}")


if __name__ == "__main__":
  main()
