"""deconvcuda: the DeconvNet of Zeiler & Fergus (2014) with fused C++/CUDA kernels.

    r = deconvcuda.project(model, images, layer="features.29", channel=7)
    top = deconvcuda.top_activations(model, data, layer="features.29", k=9)
    deconvcuda.visualize(model, data, layers=["features.29"], out="out")
"""
from ._version import __version__

from . import ops, reference
from .engine import project
from .describe import describe
from .forward import LayerInfo, layers
from .receptive_field import ReceptiveField, crop_patches, receptive_field
from .scan import TopActivations, top_activations
from . import data, models
from .figures import visualize
from .analyses import evolution, invariance, occlusion
from .classviews import gradcam, guided_gradcam
from .sanity import SanityCheck, sanity_check
from .synthesis import synthesize

__all__ = ["ops", "reference", "project", "describe", "layers", "LayerInfo", "top_activations", "TopActivations", "receptive_field",
           "ReceptiveField", "crop_patches", "visualize", "models", "data", "occlusion", "invariance", "evolution",
           "gradcam", "guided_gradcam", "sanity_check", "SanityCheck", "synthesize", "__version__"]
