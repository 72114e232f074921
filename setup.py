"""Maps the top-level folders onto the `llmc` namespace (metadata lives in pyproject.toml).

`compiler/` installs as `llmc.compiler`, `runtime/` as `llmc.runtime`; `templates/` and `specs/`
ship as package data. No top-level `compiler` or `runtime` package reaches site-packages.
"""

from setuptools import find_packages, setup

FOLDERS = {"llmc.compiler": "compiler", "llmc.runtime": "runtime",
           "llmc.templates": "templates", "llmc.specs": "specs"}

packages = []
for name, folder in FOLDERS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=FOLDERS)
