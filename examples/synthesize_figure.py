"""The README's figure of what a unit saw beside what it wants to see: the embedded VGG16 at three
depths, per channel its 9 strongest activations over crops of the bundled photos projected by the
DeconvNet and by guided backpropagation, and the image patches (deconvcuda.visualize's channel
figure), beside the image
deconvcuda.synthesize makes for it (128 px, the default regularizers).

    .venv/bin/python examples/synthesize_figure.py docs/synthesize_vgg16.png

It also checks the issue's "done when" and prints the numbers: each synthesized image's activation
against the channel's strongest over the photos (map mean; map maximum against top_activations'
strongest unit), and that the same seed gives the same images (bitwise).
"""
import sys
import tempfile
import time

import torch

import deconvcuda
from deconvcuda.capture import capture

SIZE = 128
#: (layer, channels): conv3_3, conv4_3, conv5_3 after their ReLUs.
CHOSEN = [("features.15", [0, 128]), ("features.22", [0, 256]), ("features.29", [5, 256])]


def main(path: str = "docs/synthesize_vgg16.png") -> None:
    model = deconvcuda.models.build("vgg16_hed")
    photos = deconvcuda.data.bundled_photos(size=SIZE, crops_per_photo=14)
    inputs = model.preprocessing.to_model(photos.images)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        run = deconvcuda.visualize(model, inputs, [layer for layer, _ in CHOSEN],
                                   channels={layer: channels for layer, channels in CHOSEN}, out=out,
                                   rule=["deconvnet", "guided"], image_names=photos.names, progress=False,
                                   model_name="vgg16_hed",
                                   data_name="crops of the bundled photos")
        figures = {(figure.layer, figure.channel): figure for figure in run.figures}
        from PIL import Image

        for layer, channels in CHOSEN:
            start = time.perf_counter()
            images = deconvcuda.synthesize(model, layer, channels, size=SIZE, progress=False)
            seconds = time.perf_counter() - start
            report(model, layer, channels, images, inputs, seconds)
            if layer == CHOSEN[-1][0]:
                again = deconvcuda.synthesize(model, layer, channels, size=SIZE, progress=False)
                same = torch.equal(images, again)
                print(f"{layer}: the same seed gives the same images (bitwise): {same}", flush=True)
            for i, channel in enumerate(channels):
                with Image.open(figures[(layer, channel)].path) as png:
                    rows.append((layer, channel, png.convert("RGB").copy(), images[i]))
    draw(path, rows)


def report(model, layer, channels, images, inputs, seconds):
    """Prints, per channel, the synthesized image's map mean and maximum against the photos' best."""
    with torch.no_grad():
        photo = torch.cat([capture(model, inputs[i:i + 30], [layer], "report", stop_early=True)[0][layer][:, channels]
                           for i in range(0, inputs.shape[0], 30)])
        mine = capture(model, model.preprocessing.to_model(images), [layer], "report")[0][layer]
    mine = mine[torch.arange(len(channels)), channels]
    top = deconvcuda.top_activations(model, inputs, layer, k=1, progress=False)
    for i, channel in enumerate(channels):
        mean, peak = mine[i].mean().item(), mine[i].max().item()
        photo_mean, photo_peak = photo[:, i].mean((1, 2)).max().item(), top.values[channel, 0].item()
        beats = mean > photo_mean and peak > photo_peak
        print(f"{layer} channel {channel}: synthesized map mean {mean:.1f} (photos' best {photo_mean:.1f}, "
              f"x{mean / photo_mean:.1f}); map max {peak:.1f} (top_activations' strongest {photo_peak:.1f}, "
              f"x{peak / photo_peak:.1f}); beats both: {beats}; {seconds:.0f} s", flush=True)


def draw(path, rows):
    """One row per channel: the gallery's channel figure, then the synthesized image, the same height."""
    from deconvcuda.figures.plots import hwc, new_figure, save_figure

    aspect = max(top9.width / top9.height for _, _, top9, _ in rows)
    height = 2.0
    figure = new_figure(height * (aspect + 1) + 0.9, height * len(rows) + 0.4)
    axes = figure.subplots(len(rows), 2, squeeze=False, width_ratios=[aspect, 1])
    for row, (layer, channel, top9, synthesized) in enumerate(rows):
        axes[row][0].imshow(top9, interpolation="antialiased")
        axes[row][0].set_xticks([])
        axes[row][0].set_yticks([])
        axes[row][0].set_ylabel(f"{layer}\nchannel {channel}", fontsize=9)
        axes[row][1].imshow(hwc(synthesized), interpolation="antialiased")
        axes[row][1].set_axis_off()
        if row == 0:
            axes[row][0].set_title("its 9 strongest activations over the photos", fontsize=10)
            axes[row][1].set_title(f"synthesize ({SIZE} px)", fontsize=10)
    save_figure(figure, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
