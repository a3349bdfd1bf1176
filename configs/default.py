r"""The config file of the command line: `opdplus-train --config=configs/default.py:<preset>`.

absl's config flags load a config from a file path, so this file stays where users point to it;
the presets themselves, and their documentation, live in the package module
`opdplus_jax.configs.default` (installed with opdplus_jax, imported by the demo). A config of
your own can be a file like this one whose `get_config` starts from a preset and changes fields.
"""

from ml_collections import config_dict

from opdplus_jax.configs import default


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
    """Returns `opdplus_jax.configs.default.get_config(arg)`: the locked preset `arg`."""
    return default.get_config(arg)
