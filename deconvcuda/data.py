"""Small image datasets for the figures: scikit-image's bundled photos, or a folder of your own.

    photos = deconvcuda.data.bundled_photos(size=224)     # ImageSet: .images [N, 3, 224, 224], .names
    mine = deconvcuda.data.load_folder("my_images/", size=224)   # in memory: a small folder
    x = model.preprocessing.to_model(photos.images)

    folder = deconvcuda.data.ImageFolder("imagenet/val/", size=224, transform=model.preprocessing)
    tops = deconvcuda.top_activations(model, folder, ["features.15", "features.29"])   # read lazily, in parts
    listed = deconvcuda.data.ImageFolder.from_list("images.txt", size=224)              # one path a line

Images are RGB floats in [0, 1]; the model's preprocessing turns them into its input. Nothing is
downloaded: only the photos that ship inside the scikit-image wheel are used. ``load_folder`` reads
a small folder into memory at once; ``ImageFolder`` is a Dataset for folders of any size, read one
image at a time (in the scan's worker processes).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["ImageSet", "BUNDLED_PHOTOS", "bundled_photos", "load_folder", "square_crops", "ImageFolder",
           "UnreadableImageError"]


@dataclass
class ImageSet:
    """Images ``[N, 3, size, size]`` (RGB floats in [0, 1]) and one name per image."""

    images: torch.Tensor
    names: List[str]

    def __post_init__(self):
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"ImageSet: {self.images.shape[0]} images but {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------------------------- #
# scikit-image's bundled photos
# --------------------------------------------------------------------------------------------- #

def _skimage_loader(function: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, function)()
        return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
    return load


# Photos (not synthetic test patterns) that scikit-image 0.26 ships inside its wheel, so they load
# without a network; the others in skimage.data are fetched with pooch and are left out on purpose.
BUNDLED_PHOTOS: Dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage_loader("astronaut"),
    "chelsea": _skimage_loader("chelsea"),
    "coffee": _skimage_loader("coffee"),
    "rocket": _skimage_loader("rocket"),
    "motorcycle": _skimage_loader("stereo_motorcycle"),
    "hubble_deep_field": _skimage_loader("hubble_deep_field"),
    "retina": _skimage_loader("retina"),
    "immunohistochemistry": _skimage_loader("immunohistochemistry"),
    "camera": _skimage_loader("camera"),
    "coins": _skimage_loader("coins"),
    "moon": _skimage_loader("moon"),
    "clock": _skimage_loader("clock"),
    "grass": _skimage_loader("grass"),
    "gravel": _skimage_loader("gravel"),
    "brick": _skimage_loader("brick"),
}


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Gray, RGB or RGBA arrays of any dtype -> [H, W, 3] uint8."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        if image.max(initial=0.0) <= 1.0:
            image = image * 255.0
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def square_crops(image: np.ndarray, count: int) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """``count`` square windows (top, left, bottom, right) of ``image``, each with a short label.

    The first is the largest centred square ("center"); then the four quadrants of that square
    (half its side: "top-left" ...), then windows a third of its side on a 3x3 grid ("r0c0" ...).
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    windows = [("center", (top, left, top + side, left + side))]
    for grid, labels in ((2, ("top-left", "top-right", "bottom-left", "bottom-right")),
                         (3, tuple(f"r{r}c{c}" for r in range(3) for c in range(3)))):
        step = side // grid
        for i, label in enumerate(labels):
            r, c = divmod(i, grid)
            windows.append((label, (top + r * step, left + c * step, top + (r + 1) * step, left + (c + 1) * step)))
    if count < 1 or count > len(windows):
        raise ValueError(f"square_crops: count must be between 1 and {len(windows)}, got {count}")
    return windows[:count]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, reducing_gap=3.0))


def _stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """[H, W, 3] uint8 arrays -> [N, 3, H, W] float32 in [0, 1]."""
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.to(torch.float32).div_(255.0).contiguous()


def bundled_photos(size: int = 224, crops_per_photo: int = 5, photos: Optional[Sequence[str]] = None) -> ImageSet:
    """scikit-image's bundled photos as a small dataset: ``crops_per_photo`` square crops of each
    (see :func:`square_crops`), resized to ``size`` x ``size``; names like ``"chelsea/top-left"``.

    photos: which ones (default all of :data:`BUNDLED_PHOTOS`, in that order).
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"bundled_photos: size must be a positive int, got {size!r}")
    try:
        import skimage.data  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("bundled_photos: the bundled photos come from scikit-image; install it with "
                                  "`pip install scikit-image`, or pass a folder of your own images") from None
    selected = list(BUNDLED_PHOTOS) if photos is None else list(photos)
    unknown = [name for name in selected if name not in BUNDLED_PHOTOS]
    if unknown or not selected:
        raise ValueError(f"bundled_photos: unknown photos {unknown}; expected names from {', '.join(BUNDLED_PHOTOS)}")
    arrays, names = [], []
    for photo in selected:
        image = _to_rgb_uint8(BUNDLED_PHOTOS[photo]())
        for label, (top, left, bottom, right) in square_crops(image, crops_per_photo):
            arrays.append(_resize(image[top:bottom, left:right], size))
            names.append(f"{photo}/{label}")
    return ImageSet(_stack(arrays), names)


# --------------------------------------------------------------------------------------------- #
# A folder of the user's images
# --------------------------------------------------------------------------------------------- #

class UnreadableImageError(OSError):
    """A file that Pillow cannot read as an image (an OSError, so a scan skips it with a warning)."""


def _check_size(size, caller: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{caller}: size must be a positive int, got {size!r}")
    return size


def _check_directory(directory, caller: str) -> str:
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"{caller}: image directory {directory!r} does not exist")
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{caller}: {directory!r} is not a directory")
    return directory


def _read_image(path: str, size: int) -> np.ndarray:
    """One file as [size, size, 3] uint8 RGB: EXIF orientation applied, the shorter side resized to
    ``size``, the centre cropped. Raises UnreadableImageError naming the file where Pillow cannot."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
            image = ImageOps.fit(image, (size, size), Image.BICUBIC, centering=(0.5, 0.5))
    except Exception as error:  # Pillow raises many types for broken or foreign files
        raise UnreadableImageError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None
    return np.asarray(image)


def load_folder(directory: str, size: int = 224) -> ImageSet:
    """Every image file directly inside ``directory`` (sorted by name), RGB, the shorter side resized
    to ``size`` and the centre cropped to ``size`` x ``size``; names are the file names.

    Files Pillow cannot read are skipped with a warning that names them; hidden files and
    subfolders are ignored. A missing directory, or one without a readable image, is an error.
    """
    _check_size(size, "load_folder")
    directory = _check_directory(directory, "load_folder")
    files = sorted(entry.name for entry in os.scandir(directory)
                   if entry.is_file() and not entry.name.startswith("."))
    arrays, names = [], []
    for name in files:
        try:
            arrays.append(_read_image(os.path.join(directory, name), size))
        except UnreadableImageError as error:
            warnings.warn(f"load_folder: skipping {error}", stacklevel=2)
            continue
        names.append(name)
    if not arrays:
        tried = f"{len(files)} file(s) tried" if files else "it holds no files"
        raise ValueError(f"load_folder: no readable image in {directory!r} ({tried})")
    return ImageSet(_stack(arrays), names)


class ImageFolder(torch.utils.data.Dataset):
    """Every image file under ``root`` as a Dataset, read lazily: item ``i`` is file ``files[i]``
    (paths relative to ``root``, sorted; subfolders too where ``recursive``; hidden files and folders
    left out; or the ``files`` given, and :meth:`from_list` reads them from a text file) as ``[3, size, size]`` float32 RGB in [0, 1] (the shorter side resized to ``size``, the
    centre cropped), then ``transform``: a callable on that tensor, or an object with ``to_model``
    such as ``model.preprocessing`` (applied to it as a batch of one).

    Only the file names are listed up front, so a folder of any size costs a list of names; the
    scan reads the images in worker processes. A file Pillow cannot read raises
    :class:`UnreadableImageError` (an OSError) naming it, which ``top_activations`` reports as a
    warning and skips; ``names`` are the files' relative paths, for captions.
    """

    def __init__(self, root, size: int = 224, transform=None, recursive: bool = True, *,
                 files: Optional[Sequence[str]] = None):
        caller = "ImageFolder"
        self.size = _check_size(size, caller)
        self.root = _check_directory(root, caller)
        if transform is not None and not callable(transform) and not hasattr(transform, "to_model"):
            raise TypeError(f"{caller}: transform must be a callable on a [3, H, W] tensor or have a to_model "
                            f"method (a deconvcuda.models.Preprocessing), got {type(transform).__name__}")
        self.transform = transform
        if files is not None:  # the caller's list, in its order (from_list)
            self.files: List[str] = [os.fspath(name) for name in files]
            if not self.files:
                raise ValueError(f"{caller}: files is empty; name at least one image file")
            return
        self.files = []
        for directory, subdirectories, names in os.walk(self.root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".")) if recursive else []
            relative = os.path.relpath(directory, self.root)
            for name in names:
                if not name.startswith(".") and os.path.isfile(os.path.join(directory, name)):
                    self.files.append(name if relative == "." else os.path.join(relative, name))
        self.files.sort()
        if not self.files:
            raise ValueError(f"{caller}: no files in {self.root!r}" + (" or its subfolders" if recursive else ""))

    @classmethod
    def from_list(cls, list_file, size: int = 224, transform=None) -> "ImageFolder":
        """The images a text file lists, one path a line, in its order: relative paths are relative to
        the list's folder; blank lines and lines starting with ``#`` are skipped. ``names`` are the
        paths as the list writes them. Only the list is read here; a listed file that is missing or
        not an image is skipped with a warning when the scan reads it."""
        caller = "ImageFolder.from_list"
        list_file = os.fspath(list_file)
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"{caller}: no file {list_file!r} (expected a text file listing images, one "
                                    "path a line)")
        try:
            with open(list_file, encoding="utf-8") as lines:
                paths = [line.strip() for line in lines]
        except UnicodeDecodeError:
            raise ValueError(f"{caller}: {list_file!r} is not a text file; expected a list of image paths, one a "
                             "line (e.g. `find photos -name '*.jpg' > list.txt`)") from None
        paths = [path for path in paths if path and not path.startswith("#")]
        if not paths:
            raise ValueError(f"{caller}: {list_file!r} lists no image paths (one a line; blank lines and lines "
                             "starting with # are skipped)")
        return cls(os.path.dirname(os.path.abspath(list_file)), size, transform, files=paths)

    @property
    def names(self) -> List[str]:
        return list(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"ImageFolder: index must be an int, got {type(index).__name__}")
        if not -len(self.files) <= index < len(self.files):
            raise IndexError(f"ImageFolder: index {index} is out of range for {len(self.files)} files")
        image = _stack([_read_image(os.path.join(self.root, self.files[index]), self.size)])
        if self.transform is None:
            return image[0]
        if hasattr(self.transform, "to_model"):
            return self.transform.to_model(image)[0]
        return self.transform(image[0])

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self.files)} files, size={self.size})"
