"""Sphinx configuration for snnkit.

Build: ``sphinx-build -W -b html docs docs/_build/html``; doctests:
``sphinx-build -W -b doctest docs docs/_build/doctest``. The build is offline:
cross-links to Python and PyTorch are fetched only when the environment variable
``SNNKIT_DOCS_INTERSPHINX=1`` is set.
"""
import os

import snnkit

project = "snnkit"
author = "snnkit developers"
copyright = "snnkit developers"
release = snnkit.__version__
version = release
language = "en"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "matplotlib.sphinxext.plot_directive",
]

exclude_patterns = ["_build", "tutorials/scripts"]
templates_path = []

# API reference: one generated page per public name (docs/api/generated/, not committed).
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Offline by default: no network in CI. Set SNNKIT_DOCS_INTERSPHINX=1 to link Python/PyTorch.
intersphinx_mapping = {}
if os.environ.get("SNNKIT_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
    }

# Tutorial figures: the plot directive runs the tutorial scripts when the docs build.
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_rcparams = {"figure.figsize": (7.0, 3.2)}

doctest_global_setup = "import torch\ntorch.manual_seed(0)\n"

html_theme = "furo"
html_title = f"snnkit {release}"
