"""deconvcuda: the DeconvNet of Zeiler & Fergus (2014) with fused C++/CUDA kernels.

    r = deconvcuda.project(model, images, layer="features.29", channel=7)
    top = deconvcuda.top_activations(model, data, layer="features.29", k=9)
    deconvcuda.visualize(model, data, layers=["features.29"], out="out")
"""
from . import ops, reference

__version__ = "0.1.0"
