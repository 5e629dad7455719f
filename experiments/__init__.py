"""Experiments: one config per experiment (``experiments/configs``), the modules that run them (``images``, ``toy2d``,
``distill``, sharing ``common``) and the ``jaxgen`` command line (``cli``). The library ``jaxgen`` never imports
this package."""
