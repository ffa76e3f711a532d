"""fastrank's Triton kernels, installed only as ``fastrank.kernels``.

The folder sits at the top of the repository, but the distribution never installs a top-level
``kernels`` module: that name belongs to the Hugging Face ``kernels`` package, which transformers probes
for. This file deliberately defines no ``__version__``, so that if the repository root itself is on
``sys.path`` (``python -m pytest`` from a checkout), transformers' probe still reports the hub package
as absent instead of mistaking this folder for it.
"""
