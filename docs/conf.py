"""Sphinx configuration of the pyro-vae documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (after
``pip install -e ".[docs]"``). The notebooks of ``notebooks/`` are executed during the build in
their small setting (``PYRO_VAE_SMOKE=1``), since git holds them without outputs.
"""

import os
from importlib.metadata import version as _version

# The notebooks read this to run their small "smoke" setting; the kernels inherit it.
os.environ["PYRO_VAE_SMOKE"] = "1"
# The notebooks' models are small: one thread each is as fast on an idle machine and several times
# faster on a busy one (threads spin waiting for each other). Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Figures rendered inline by the kernel, never a window.
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")

project = "pyro-vae"
author = "the pyro-vae authors"
copyright = "the pyro-vae authors"
release = _version("pyro-vae")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown (myst-parser) and notebooks; replaces "myst_parser"
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints"]

# -- autodoc ------------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
python_use_unqualified_type_names = True
# Document this project's docstrings only: an override of a torch or Pyro method without a
# docstring of its own (``forward``, ``expand``, ``log_prob``) is left out rather than shown with
# the parent's docstring, whose markup is not this project's.
autodoc_inherit_docstrings = False

# -- Markdown (README sections) and notebooks ---------------------------------------------------
myst_heading_anchors = 3
nb_execution_mode = "force"          # git holds the notebooks without outputs: always run them
nb_execution_timeout = 300           # seconds per cell
nb_execution_raise_on_error = True   # a failing cell fails the build
nb_execution_in_temp = True          # runs write nothing into the source tree
nb_merge_streams = True
# README.md is written for the repository: a link there to a repository file (``tests/...``,
# ``benchmarks/README.md``) has no page here. Such links are not warned about; they render as
# links that go nowhere. Every other unresolved link in a Markdown page still fails the build.
nitpick_ignore_regex = [
    ("myst", r"(\./)?(benchmarks|tests|notebooks|pyro_vae|models|guides|docs|\.ci)/.+"),
    ("myst", r"(\./)?[\w.-]+\.(toml|py|md|txt|ipynb)"),
]

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyro-vae {release}"

# -- every notebook of notebooks/ is in the docs ------------------------------------------------
# docs/notebooks/ holds symbolic links to ../../notebooks/*.ipynb (one copy of each notebook).
_here = os.path.dirname(os.path.abspath(__file__))
_missing = sorted(
    name for name in os.listdir(os.path.join(_here, "..", "notebooks"))
    if name.endswith(".ipynb") and not os.path.exists(os.path.join(_here, "notebooks", name)))
if _missing:
    raise RuntimeError(
        "notebooks without a link in docs/notebooks/: " + ", ".join(_missing)
        + "; add one with: cd docs/notebooks && ln -s ../../notebooks/NAME.ipynb .")


# -- references to re-exported names ------------------------------------------------------------
# Docstrings write :func:`pyro_vae.fit` and :class:`~pyro_vae.Dataset`, the names users import;
# the API pages document each object once, under the module that defines it
# (``pyro_vae.training.fit``). A reference that does not resolve as written is retried under the
# canonical name of the object it names, found by importing it.
def _canonical_name(target, module):
    import importlib

    names = ([f"{module}.{target}"] if module else []) + [target]
    for name in (name for name in names if name.startswith("pyro_vae.")):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            owner = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if owner and qualname and owner.startswith("pyro_vae"):
                return f"{owner}.{qualname}"
            break
    return None


def _resolve_reexport(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    canonical = _canonical_name(node["reftarget"], node.get("py:module"))
    if canonical is None or canonical == node["reftarget"]:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical,
                               node, contnode)


# -- README anchors across the guide's pages ----------------------------------------------------
# The guide splits README.md over several pages, so a README link to a section (``#conformance``)
# may point to another page. Each guide heading's anchor is registered as a label, which such a
# link then finds wherever the section landed.
def _register_guide_anchors(app, doctree):
    docname = app.env.docname
    if not docname.startswith("guide/"):
        return
    std = app.env.get_domain("std")
    for slug, (_line, node_id, title) in app.env.metadata[docname].get("myst_slugs", {}).items():
        if slug not in std.labels and slug not in std.anonlabels:
            std.labels[slug] = (docname, node_id, title)
            std.anonlabels[slug] = (docname, node_id)


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
    app.connect("doctree-read", _register_guide_anchors)
