"""Package layout; the metadata lives in pyproject.toml.

The folders common/, edge/, cloud/ and simulations/ install as fedge.common, fedge.edge, fedge.cloud and
fedge.simulations. The list is computed from the folders present, since an image may copy only some of them
(the edge image has neither cloud/ nor simulations/).
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = ("common", "edge", "cloud", "simulations")

present = [p for p in LAYERS if os.path.isfile(os.path.join(HERE, p, "__init__.py"))]
setup(
    packages=["fedge", *(f"fedge.{p}{'.' + s if s else ''}" for p in present
                         for s in ["", *find_packages(os.path.join(HERE, p))])],
    package_dir={"fedge": "fedge", **{f"fedge.{p}": p for p in present}},
)
