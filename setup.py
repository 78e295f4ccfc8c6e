"""Build hook: the wheel ships the top-level `configs/` presets as `cosmos_jax/configs/` (see
`cosmos_jax.config._presets_dir`); everything else is declared in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPresets(build_py):
    """build_py that also copies configs/ (model and mesh presets, JSON) into the built cosmos_jax package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_tree("configs", os.path.join(self.build_lib, "cosmos_jax", "configs"))


setup(cmdclass={"build_py": BuildPyWithPresets})
