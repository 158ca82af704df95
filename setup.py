"""Package layout: the top-level folders install as subpackages of `blockrt`.

`pyproject.toml` holds the metadata; this file only maps folders to package names and lets
setuptools find every package under each (`runtime/serve` -> `blockrt.runtime.serve`, ...), so a
new subfolder with an `__init__.py` ships without editing a list.
"""

from setuptools import find_packages, setup

# package name -> folder in the repository
ROOTS = {
    "blockrt": "blockrt",
    "blockrt.exporter": "exporter",
    "blockrt.graphs": "graphs",
    "blockrt.runtime": "runtime",
}

setup(
    package_dir=ROOTS,
    packages=[f"{name}.{sub}" if sub else name
              for name, folder in ROOTS.items() for sub in ["", *find_packages(folder)]],
)
