"""The README's figure of what a unit saw beside what it wants to see: the embedded VGG16 at three
depths, per channel the gallery's channel figure as ``deconvcuda.visualize(..., synthesize=True)``
draws it: its 9 strongest activations over crops of the bundled photos projected by the DeconvNet
and by guided backpropagation, the image patches, and the channel's optimized image
(``deconvcuda.synthesize``, 128 px, the default regularizers), one row per channel.

    .venv/bin/python examples/synthesize_figure.py docs/synthesize_vgg16.png

It also checks the issue's "done when" and prints the numbers: each optimized image (as the gallery
shows it, the 8-bit PNG) against the channel's strongest activation over the photos (map mean;
map maximum against top_activations' strongest unit), and that the same seed gives the same images
(``synthesize`` called again gives the gallery's PNG, pixel for pixel); it exits non-zero where
either fails.
"""
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import deconvcuda
from deconvcuda.capture import capture

SIZE = 128
#: (layer, channels): conv3_3, conv4_3, conv5_3 after their ReLUs.
CHOSEN = [("features.15", [0, 128]), ("features.22", [0, 256]), ("features.29", [5, 256])]


def main(path: str = "docs/synthesize_vgg16.png") -> None:
    model = deconvcuda.models.build("vgg16_hed")
    photos = deconvcuda.data.bundled_photos(size=SIZE, crops_per_photo=14)
    inputs = model.preprocessing.to_model(photos.images)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run = deconvcuda.visualize(model, inputs, [layer for layer, _ in CHOSEN],
                                   channels={layer: channels for layer, channels in CHOSEN}, out=out,
                                   rule=["deconvnet", "guided"], image_names=photos.names, synthesize=True,
                                   progress=False, model_name="vgg16_hed", data_name="crops of the bundled photos")
        print(f"visualize(..., synthesize=True): {time.perf_counter() - start:.0f} s; optimized images "
              + ", ".join(f"{record.layer} {record.seconds['synthesize']:.0f} s" for record in run.layers), flush=True)
        figures = {(figure.layer, figure.channel): figure for figure in run.figures}
        rows, beaten = [], []
        for layer, channels in CHOSEN:
            drawn = [figures[(layer, channel)] for channel in channels]
            optimized = torch.stack([torch.from_numpy(png(figure.optimized)).permute(2, 0, 1) / 255.0
                                     for figure in drawn])
            beaten += report(model, layer, channels, optimized, inputs)
            rows += [(layer, figure.channel, png(figure.path)) for figure in drawn]
        layer, channels = CHOSEN[-1]
        again = deconvcuda.synthesize(model, layer, channels, size=SIZE, progress=False)
        same = all(np.array_equal(deconvcuda.figures.render.rgb_pixels(image), png(figures[(layer, channel)].optimized))
                   for image, channel in zip(again, channels))
        print(f"{layer}: synthesize with the same seed gives the gallery's images, pixel for pixel: {same}", flush=True)
    draw(path, rows)
    if not all(beaten) or not same:
        sys.exit("the issue's 'done when' does not hold: see the lines above")


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def report(model, layer, channels, images, inputs) -> list:
    """Prints, per channel, the optimized image's map mean and maximum against the photos' best;
    returns, per channel, whether it beats both."""
    with torch.no_grad():
        photo = torch.cat([capture(model, inputs[i:i + 30], [layer], "report", stop_early=True)[0][layer][:, channels]
                           for i in range(0, inputs.shape[0], 30)])
        mine = capture(model, model.preprocessing.to_model(images), [layer], "report")[0][layer]
    mine = mine[torch.arange(len(channels)), channels]
    top = deconvcuda.top_activations(model, inputs, layer, k=1, progress=False)
    beaten = []
    for i, channel in enumerate(channels):
        mean, peak = mine[i].mean().item(), mine[i].max().item()
        photo_mean, photo_peak = photo[:, i].mean((1, 2)).max().item(), top.values[channel, 0].item()
        beats = mean > photo_mean and peak > photo_peak
        print(f"{layer} channel {channel}: optimized map mean {mean:.1f} (photos' best {photo_mean:.1f}, "
              f"x{mean / photo_mean:.1f}); map max {peak:.1f} (top_activations' strongest {photo_peak:.1f}, "
              f"x{peak / photo_peak:.1f}); beats both: {beats}", flush=True)
        beaten.append(beats)
    return beaten


def draw(path, rows):
    """The channel figures one under the other, each labelled with its layer and channel."""
    from deconvcuda.figures.plots import new_figure, save_figure

    aspect = max(figure.shape[1] / figure.shape[0] for _, _, figure in rows)
    height = 2.0
    figure = new_figure(height * aspect + 0.6, height * len(rows))
    axes = figure.subplots(len(rows), 1, squeeze=False)
    for row, (layer, channel, picture) in enumerate(rows):
        axes[row][0].imshow(picture, interpolation="antialiased")
        axes[row][0].set_xticks([])
        axes[row][0].set_yticks([])
        for side in axes[row][0].spines.values():
            side.set_visible(False)
        axes[row][0].set_ylabel(f"{layer}\nchannel {channel}", fontsize=9)
    save_figure(figure, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
