"""How alike two saliency maps are: the measures of Adebayo et al., "Sanity Checks for Saliency Maps"
(NeurIPS 2018), in torch.

    maps = saliency_maps(projections)            # [N, C, H, W] -> [N, H, W]: sum of |p| over channels, in [0, 1]
    spearman(maps_a.flatten(1), maps_b.flatten(1))   # [N]: Spearman's rank correlation (ties: average ranks)
    ssim(maps_a, maps_b)                         # [N]: mean SSIM (Wang et al. 2004), Gaussian window

``saliency_maps`` is the normalisation of the paper's code (``abs_grayscale_norm``, i.e. PAIR
saliency's ``VisualizeImageGrayscale``): the absolute values summed over the input channels, minus
their minimum, divided by their 99th percentile minus the minimum, clipped to [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["saliency_maps", "ranks", "spearman", "ssim", "PERCENTILE", "SSIM_WINDOW", "SSIM_SIGMA"]

#: The percentile that maps to 1 in ``saliency_maps`` (the paper's code: 99).
PERCENTILE = 99.0
#: SSIM's Gaussian window (Wang et al. 2004): 11 x 11, standard deviation 1.5.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
#: SSIM's stabilising constants, times the data range: C1 = (K1 L)^2, C2 = (K2 L)^2.
SSIM_K1, SSIM_K2 = 0.01, 0.03


def saliency_maps(projections: torch.Tensor, percentile: float = PERCENTILE) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, H, W]`` float64 in [0, 1]: per map, the sum of |p| over the channels,
    shifted so its minimum is 0 and scaled so its ``percentile``-th percentile is 1, clipped. A
    constant map becomes all zeros."""
    if projections.dim() != 4:
        raise ValueError(f"saliency_maps: projections must be [N, C, H, W], got {list(projections.shape)}")
    maps = projections.detach().to(torch.float64).abs().sum(dim=1)
    flat = maps.flatten(1)
    low = flat.amin(dim=1)
    high = torch.quantile(flat, percentile / 100, dim=1)
    span = (high - low).view(-1, 1, 1)
    scaled = (maps - low.view(-1, 1, 1)) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(scaled)).clamp(0.0, 1.0)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` ``[B, M]``, each entry's rank (1..M, float64); tied entries share the
    average of the ranks they span (scipy.stats.rankdata's ``"average"``)."""
    out = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    for row, value in enumerate(values):
        ordered, order = value.sort()
        _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).to(torch.float64)                 # 1-based rank of each group's last entry
        average = ends - (counts.to(torch.float64) - 1) / 2       # the mean of the ranks the group spans
        out[row, order] = average[group]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``a`` and ``b`` (``[B, M]``), Spearman's rank correlation: Pearson's correlation of
    their ranks (ties: average ranks). Equal rows give exactly 1; a constant row that differs from the
    other (no order to share, e.g. an all-zero map against a map) gives 0."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"spearman: a and b must both be [B, M], got {list(a.shape)} and {list(b.shape)}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    norms = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    rho = torch.where(norms > 0, rho, torch.zeros_like(rho))
    equal = torch.tensor([torch.equal(x, y) for x, y in zip(a, b)], device=rho.device)
    return torch.where(equal, torch.ones_like(rho), rho.clamp(-1.0, 1.0))


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=like.device) - (size - 1) / 2
    weights = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (weights / weights.sum()).to(like.dtype)


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per pair of maps ``[B, H, W]``, the mean structural similarity (Wang et al. 2004) over every
    position where the ``window`` x ``window`` Gaussian window (standard deviation ``sigma``) lies
    wholly inside the map; local statistics weighted by the window, population (co)variances, C1 =
    (0.01 data_range)^2, C2 = (0.03 data_range)^2. The same numbers as scikit-image's
    ``structural_similarity(a, b, data_range=data_range, gaussian_weights=True,
    use_sample_covariance=False)``. Maps smaller than the window use the largest odd window that fits
    (the same ``sigma``, the Gaussian cut off sooner). Equal maps give exactly 1. Returns ``[B]`` float64."""
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"ssim: a and b must both be [B, H, W], got {list(a.shape)} and {list(b.shape)}")
    window = min(window, *a.shape[1:])
    window -= 1 - window % 2
    x, y = a.detach().to(torch.float64)[:, None], b.detach().to(torch.float64)[:, None]
    g = _gaussian_window(window, sigma, x)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, only where the window fits
        return F.conv2d(F.conv2d(t, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)
