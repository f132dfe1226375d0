"""The paper's other experiments (Zeiler & Fergus 2014, Sec. 4): occlusion sensitivity (Fig. 7),
feature evolution during training (Fig. 4) and invariance to translation, scale and rotation (Fig. 5).
Their figures are drawn by :mod:`deconvcuda.figures.plots`, their commands are in :mod:`deconvcuda.cli`.

    values = deconvcuda.occlusion(model, images, "features.15", window=16, stride=8)       # [N, R, C]
    distances = deconvcuda.invariance(model, images, ["features.3", ""], "rotate", range(0, 91, 15))
    cells = deconvcuda.evolution(model, ["epoch1.pt", "epoch2.pt"], images, "features.3", [0, 1, 2])
"""
from .evolution import evolution
from .invariance import invariance
from .occlusion import occlusion

__all__ = ["occlusion", "invariance", "evolution"]
