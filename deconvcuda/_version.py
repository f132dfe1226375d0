"""The package version (``deconvcuda.__version__``, the gallery, ``deconvcuda --version``); pyproject.toml
says the same."""
__version__ = "0.1.0"
