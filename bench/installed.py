"""tenantsync timed as an installed package runs it: with its modules' bytecode compiled.

``pip install`` compiles a package's ``.pyc`` files when it installs it. A checkout run with
``PYTHONDONTWRITEBYTECODE`` set (this machine sets it) never caches them, so every tenantsync
process a benchmark starts would first compile each module it imports from source (a CLI
restore, each of its decoding workers, each process of a fleet's start), a cost no user's
installation has. The scripts import this inside ``main``: tests load some of them as modules
without ``bench/`` on ``sys.path``.
"""

from __future__ import annotations

import compileall
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tenantsync", "scheduler", "workers")


def compile_sources(root: str = REPO) -> None:
    """Write the bytecode of the packages the benchmarks start from ``root`` (this checkout,
    or another one a benchmark compares it with); compileall writes it whatever
    PYTHONDONTWRITEBYTECODE says, and is quick when it is already up to date."""
    for package in PACKAGES:
        if not compileall.compile_dir(os.path.join(root, package), quiet=1):
            raise SystemExit(f"bench: compiling {package} failed")
