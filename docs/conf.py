"""Sphinx configuration of pop3d's documentation (built by tests/test_docs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pop3d  # noqa: E402

project = "pop3d"
author = "the pop3d developers"
copyright = "the pop3d developers"
release = version = pop3d.__version__

extensions = ["sphinx.ext.autodoc"]
# The docstrings write `name` for a Python name, as Twisted's do.
default_role = "py:obj"
autodoc_member_order = "bysource"
autodoc_typehints = "none"
exclude_patterns = ["_build", "_generated"]
html_theme = "alabaster"
html_static_path: list[str] = []


def _write_help() -> None:
    """``twistd pop3d --help``, from the code, for options.rst."""
    from pop3d.tap import Options

    generated = Path(__file__).resolve().parent / "_generated"
    generated.mkdir(exist_ok=True)
    (generated / "help.txt").write_text("Usage: twistd [options] pop3d " + str(Options()))


_write_help()
