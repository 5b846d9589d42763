"""Which packages are installed, and from where: everything else is in pyproject.toml.

kernels/ sits at the top level (each kernel beside its torch reference) and is imported as ``decodelab.kernels``:
the bare name ``kernels`` is Hugging Face's kernels package on PyPI. pyproject.toml alone cannot list a package
found in one folder under another name, hence this file.
"""

from setuptools import find_namespace_packages, find_packages, setup

KERNELS = ["decodelab.kernels" + name[len("kernels"):] for name in find_packages(include=["kernels", "kernels.*"])]

setup(packages=find_packages(include=["decodelab", "decodelab.*"])
      + find_namespace_packages(include=["hydra_plugins", "hydra_plugins.*"]) + KERNELS,
      package_dir={"decodelab.kernels": "kernels"})
