"""Package discovery for the `package-dir` mapping in pyproject.toml.

setuptools' own `packages.find` names a package by its folder (blocks/ -> `blocks`), so it cannot
find the packages that blocks/ and kernels/ become (`hybridlab.blocks`, `hybridlab.kernels`).
Here every folder of the mapping is searched and its packages are named under the mapped name,
so a new subpackage anywhere lands in the wheel without editing a list. Everything else is in
pyproject.toml.
"""
from setuptools import find_packages, setup
from setuptools.config.pyprojecttoml import load_file

package_dir = load_file("pyproject.toml")["tool"]["setuptools"]["package-dir"]
packages = []
for name, folder in package_dir.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
setup(packages=packages)
