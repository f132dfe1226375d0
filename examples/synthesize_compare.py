"""The measurement behind synthesize's default regularizers (docs/synthesize.md): on the embedded VGG16,
at several depths, the activation each set of regularizers reaches for a few channels, beside the
strongest activation of those channels over crops of the bundled photos, and a figure of the images.

    .venv/bin/python examples/synthesize_compare.py --out docs --size 96 --steps 128

Writes docs/synthesize_compare.png (rows: regularizer sets; columns: layer/channel) and prints the
table (Markdown) that docs/synthesize.md records; the raw numbers go to docs/synthesize_compare.json.
"""
import argparse
import json
import time
from pathlib import Path

import torch

import deconvcuda
from deconvcuda.capture import capture
from deconvcuda.synthesis import Blur, ContributionClip, Decay, Fourier, Jitter, NormClip, Rotate, Scale

#: The sets compared: a name, the regularizers (all at their default strengths unless written out).
SETS = {
    "none (pixels)": [],
    "decay + blur (Yosinski)": [Decay(), Blur()],
    "blur + norm clip + contribution clip (Yosinski)": [Blur(), NormClip(), ContributionClip()],
    "jitter + scale + rotate (pixels)": [Jitter(), Scale(), Rotate()],
    "fourier": [Fourier()],
    "fourier + jitter + scale + rotate": [Fourier(), Jitter(), Scale(), Rotate()],
    "fourier + transforms + decay + blur": [Fourier(), Jitter(), Scale(), Rotate(), Decay(), Blur()],
    "fourier + scale + rotate": [Fourier(), Scale(), Rotate()],
}


def photo_statistics(model, layer, images, batch_size=35):
    """Per channel, the best over the images of: the map's mean, its maximum, its centre unit."""
    best = None
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            output = capture(model, images[start:start + batch_size], [layer], "photo_statistics",
                             stop_early=True)[0][layer]
            h, w = output.shape[-2:]
            stats = torch.stack([output.mean((2, 3)), output.amax((2, 3)), output[:, :, h // 2, w // 2]])
            stats = stats.amax(1)  # [3, C]
            best = stats if best is None else torch.maximum(best, stats)
    return {"mean": best[0], "max": best[1], "centre": best[2]}


def layer_values(model, layer, rgb, channels):
    """Per image n: channel channels[n]'s map mean, maximum and centre unit on the synthesized image."""
    with torch.no_grad():
        output = capture(model, model.preprocessing.to_model(rgb), [layer], "layer_values", stop_early=True)[0][layer]
    maps = output[torch.arange(len(channels)), torch.tensor(channels)]
    return maps.mean((1, 2)), maps.amax((1, 2)), maps[:, maps.shape[1] // 2, maps.shape[2] // 2]


def high_frequency_share(rgb):
    """The share of the image's spectral energy (mean removed) above a quarter of the Nyquist frequency."""
    centred = rgb - rgb.mean((2, 3), keepdim=True)
    power = torch.fft.rfft2(centred).abs().pow(2)
    fy = torch.fft.fftfreq(rgb.shape[-2])[:, None]
    fx = torch.fft.rfftfreq(rgb.shape[-1])[None, :]
    high = (fx * fx + fy * fy).sqrt() > 0.125
    return (power * high).sum((1, 2, 3)) / power.sum((1, 2, 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--layers", default="features.8,features.15,features.22,features.29")
    parser.add_argument("--per-layer", type=int, default=2, help="channels per layer")
    parser.add_argument("--sets", default="", help="comma-separated indices into SETS (default all)")
    parser.add_argument("--objective", default="channel", choices=["channel", "neuron"])
    parser.add_argument("--sweep", default="", help="comma-separated step counts: the default regularizers' "
                                                    "activation after each, instead of the comparison")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = deconvcuda.models.build("vgg16_hed")
    photos = deconvcuda.data.bundled_photos(size=args.size, crops_per_photo=14)
    inputs = model.preprocessing.to_model(photos.images)
    layers = args.layers.split(",")
    sets = list(SETS.items())
    if args.sets:
        sets = [sets[int(i)] for i in args.sets.split(",")]

    chosen, photo = {}, {}
    for layer in layers:
        photo[layer] = photo_statistics(model, layer, inputs)
        count = photo[layer]["max"].numel()
        # evenly spaced channels, each the next one that fires somewhere in the photos
        picks = []
        for i in range(args.per_layer):
            channel = i * count // args.per_layer
            while photo[layer]["max"][channel] <= 0:
                channel += 1
            picks.append(channel)
        chosen[layer] = picks

    if args.sweep:
        sweep(model, layers, chosen, photo, args, [int(steps) for steps in args.sweep.split(",")])
        return
    results, images = [], {}
    for set_name, regularizers in sets:
        for layer in layers:
            channels = chosen[layer]
            start = time.perf_counter()
            rgb = deconvcuda.synthesize(model, layer, channels, size=args.size, steps=args.steps,
                                        regularizers=regularizers, objective=args.objective, progress=False)
            seconds = time.perf_counter() - start
            mean, peak, centre = layer_values(model, layer, rgb, channels)
            high = high_frequency_share(rgb)
            images[(set_name, layer)] = rgb
            for i, channel in enumerate(channels):
                results.append({"set": set_name, "layer": layer, "channel": channel, "mean": mean[i].item(),
                                "max": peak[i].item(), "centre": centre[i].item(),
                                "photo_mean": photo[layer]["mean"][channel].item(),
                                "photo_max": photo[layer]["max"][channel].item(), "high": high[i].item(),
                                "seconds": seconds})
            print(f"{set_name:40s} {layer:12s} mean/photo-best-mean "
                  f"{[round(r['mean'] / r['photo_mean'], 2) for r in results[-len(channels):]]} "
                  f"high {[round(h, 3) for h in high.tolist()]} {seconds:.0f}s", flush=True)

    stem = "synthesize_compare" + ("" if args.objective == "channel" else f"_{args.objective}")
    (out / f"{stem}.json").write_text(json.dumps({"size": args.size, "steps": args.steps, "objective": args.objective,
                                                  "channels": chosen, "results": results}, indent=1))
    print_table(results, layers, [name for name, _ in sets], args.objective)
    draw(out / f"{stem}.png", images, [name for name, _ in sets], layers, chosen)


def sweep(model, layers, chosen, photo, args, step_counts):
    """Markdown: per layer and step count, the default regularizers' map mean over the photos' best
    (geometric mean over the channels) and the seconds the run took."""
    print("\n| steps | " + " | ".join(layers) + " |")
    print("|---|" + "---|" * len(layers))
    for steps in step_counts:
        cells = []
        for layer in layers:
            channels = chosen[layer]
            start = time.perf_counter()
            rgb = deconvcuda.synthesize(model, layer, channels, size=args.size, steps=steps, objective=args.objective,
                                        progress=False)
            seconds = time.perf_counter() - start
            mean, _, centre = layer_values(model, layer, rgb, channels)
            if args.objective == "channel":
                reached, best = mean, photo[layer]["mean"]
            else:
                reached, best = centre, photo[layer]["max"]
            ratio = (reached.clamp(min=1e-6) / best[channels]).log().mean().exp().item()
            cells.append(f"{ratio:.1f} ({seconds:.0f} s)")
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


def print_table(results, layers, set_names, objective="channel"):
    """Markdown: per set and layer, the geometric mean over channels of (synthesized / photos' best)
    for the map mean and the map maximum ("neuron": the centre unit against the photos' strongest
    unit anywhere), and the high-frequency share."""
    print("\n| regularizers | " + " | ".join(layers) + " | high-frequency share |")
    print("|---|" + "---|" * (len(layers) + 1))
    for name in set_names:
        cells, highs = [], []
        for layer in layers:
            rows = [r for r in results if r["set"] == name and r["layer"] == layer]
            def ratio(key, photo_key):
                return torch.tensor([max(r[key], 1e-6) / r[photo_key] for r in rows]).log().mean().exp().item()
            if objective == "channel":
                cells.append(f"{ratio('mean', 'photo_mean'):.1f} / {ratio('max', 'photo_max'):.1f}")
            else:
                cells.append(f"{ratio('centre', 'photo_max'):.2f}")
            highs += [r["high"] for r in rows]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(highs) / len(highs):.3f} |")


def draw(path, images, set_names, layers, chosen):
    from deconvcuda.figures.plots import hwc, new_figure, save_figure

    columns = [(layer, i) for layer in layers for i in range(len(chosen[layer]))]
    figure = new_figure(1.25 * len(columns) + 1.6, 1.3 * len(set_names) + 0.4)
    axes = figure.subplots(len(set_names), len(columns), squeeze=False)
    for row, name in enumerate(set_names):
        for column, (layer, i) in enumerate(columns):
            cell = axes[row][column]
            cell.imshow(hwc(images[(name, layer)][i]), interpolation="antialiased")
            cell.set_xticks([])
            cell.set_yticks([])
            if row == 0:
                cell.set_title(f"{layer}\nch {chosen[layer][i]}", fontsize=7)
            if column == 0:
                cell.set_ylabel(name.replace(" + ", "\n+ ", 2), fontsize=6)
    save_figure(figure, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
