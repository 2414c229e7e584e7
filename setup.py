"""Package list for setuptools; everything else is in pyproject.toml.

Every package under ``tproxy/`` is found as usual, and the top-level
``interceptors/`` folder (the built-ins) is added as ``tproxy.interceptors``,
so installing tproxy never takes the generic top-level name ``interceptors``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["tproxy", "tproxy.*"]), "tproxy.interceptors"],
    package_dir={"tproxy.interceptors": "interceptors"},
)
