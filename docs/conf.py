"""Sphinx configuration of the mcsample documentation.

``make docs`` builds the whole site, running the gallery scripts in ``docs/gallery``;
``make docs-fast`` builds it without running them (``-D plot_gallery=0``). Both use ``-W``.
"""

from __future__ import annotations

# The API pages import the installed package (``pip install -e ".[docs]"``, which ``make docs``
# does): ``mcsample.systems`` and ``mcsample.flows`` exist only as installed names.
import mcsample

project = "mcsample"
author = "The mcsample developers"
copyright = "2026, The mcsample developers"
release = mcsample.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "gallery", "**.ipynb_checkpoints"]  # gallery/: sources of auto_examples/

# -- MyST (Markdown pages) -------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "deflist", "colon_fence"]
myst_heading_anchors = 3

# -- autodoc / napoleon ----------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": False,
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- sphinx-gallery --------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "min_reported_time": 1,
}

# -- HTML ------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"mcsample {release}"
html_static_path = []
