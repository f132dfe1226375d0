"""The streaming top-k moved to :mod:`deconvcuda.scan`; this name stays for old imports."""
from .scan import TopActivations, model_device, top_activations  # noqa: F401
