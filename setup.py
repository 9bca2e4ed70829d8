"""The packages: infir2_jax and its subpackages, plus the repository's configs/ installed as
`infir2_jax/configs/`, so that `--config tiny_cpt` resolves in a wheel install too (a source
checkout or an editable install reads configs/ in place; see infir2_jax/config.py)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["infir2_jax", "infir2_jax.*"]), "infir2_jax.configs"],
    package_dir={"infir2_jax.configs": "configs"},
)
