"""The peer, airbench94, trained by its own code (the `airbench` package) on this pipeline's arrays.

Runs in the peer's environment (torch and airbench: `make peer-setup`), not the project's, and
is started by bench.side_by_side:

    .venv-peer/bin/python bench/peer.py --epochs 0.96 --seed 0 --report peer.json

Nothing in airbench is edited. Where a CPU requires it, this script changes, from outside:
its loaders' device (`gpu=0` becomes the CPU); `.cuda()` and `.half()` while `make_net94` builds
the network, so it stays on the CPU in float32 (a CPU has no fast float16); and CUDA's event
timer, which a CPU build of torch lacks. airbench94 uses no torch.compile. Its images are handed
over as float32 tensors (the loader's `images`), and its training loop, schedule, whitening,
label smoothing, lookahead and test-time augmentation (level 2) are its own.

Training FLOPs are counted with the project's own formula (tasks/lib/flops.py's conv_flops and
dense_flops, through forward hooks on the peer's network): the same counter for both systems.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
import types
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tasks.lib.flops (pure Python) from the peer's interpreter

from tasks.lib.flops import PFLOP, TRAINING_PASSES, conv_flops, dense_flops  # noqa: E402

if not torch.cuda.is_available():
    # PyPI's torchvision is built against CUDA torch: its operator registrations fail to load on a
    # CPU build. airbench uses only torchvision.transforms.Normalize, which needs none of them.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import airbench  # noqa: E402
from airbench import lib_airbench94 as airbench94  # noqa: E402
from airbench import utils as airbench_utils  # noqa: E402


class WallClockEvent:
    """torch.cuda.Event's timing on a CPU build of torch: airbench's train94 times its epochs with it."""

    def __init__(self, enable_timing: bool = False):
        self.at = 0.0

    def record(self, stream=None) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: WallClockEvent) -> float:
        return 1e3 * (end.at - self.at)


@contextlib.contextmanager
def on_the_cpu():
    """airbench's loaders on the CPU, and CUDA's timer and synchronize as CPU stand-ins."""
    defaults = list(airbench_utils.CifarLoader.__init__.__defaults__)
    defaults[-1] = "cpu"  # the `gpu` argument, also for the test loader train94 builds itself
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(airbench_utils.CifarLoader.__init__, "__defaults__", tuple(defaults)))
        if not torch.cuda.is_available():
            stack.enter_context(mock.patch.object(torch.cuda, "Event", WallClockEvent))
            stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *args, **kwargs: None))
        yield


def make_net_float32() -> nn.Module:
    """airbench94's own network, kept in float32 on the CPU (it ends in `.half().cuda()`)."""
    as_it_is = mock.patch.object(nn.Module, "half", lambda self: self)
    on_the_host = mock.patch.object(nn.Module, "cuda", lambda self, device=None: self)
    with as_it_is, on_the_host:
        return airbench94.make_net94()


def forward_flops(net: nn.Module) -> int:
    """FLOPs of one 32x32 image's forward pass through the network's conv and linear layers."""
    total = [0]

    def count(layer, inputs, output):
        if isinstance(layer, nn.Conv2d):
            positions = math.prod(output.shape[2:])
            total[0] += conv_flops(positions, layer.out_channels, layer.kernel_size, layer.in_channels, layer.groups)
        elif isinstance(layer, nn.Linear):
            total[0] += dense_flops(layer.out_features, layer.in_features)

    hooks = [layer.register_forward_hook(count) for layer in net.modules() if isinstance(layer, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, 32, 32).to(memory_format=torch.channels_last))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def cifar_file(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The .pt layout airbench's CifarLoader reads."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = [str(label) for label in range(10)]
    labels = torch.from_numpy(labels.astype(np.int64))
    payload = {"images": torch.from_numpy(images), "labels": labels, "classes": classes}
    torch.save(payload, folder / ("train.pt" if folder.name == "train" else "test.pt"))


def loader(folder: Path, images: np.ndarray, *, train: bool, batch_size: int):
    """airbench's CifarLoader over `images`, handed over as float32 (its own would be float16)."""
    options = {"aug": airbench94.hyp["aug"], "altflip": True} if train else {}
    data = airbench.CifarLoader(str(folder), train=train, batch_size=batch_size, gpu="cpu", **options)
    data.images = (torch.from_numpy(images).float() / 255).permute(0, 3, 1, 2).to(memory_format=torch.channels_last)
    return data


def main() -> None:
    """Train the peer for --epochs on the train split, test it on the test set, print and write its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, help="airbench94's epochs (its own default: 9.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=Path, default=ROOT / "data/split/train_val.npz", help="x_train, y_train")
    parser.add_argument("--test", type=Path, default=ROOT / "data/prepared/dataset.npz", help="x_test, y_test")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--report", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--describe", action="store_true", help="print the network's FLOPs and steps, train nothing")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    batch_size = airbench94.hyp["opt"]["batch_size"]
    with np.load(arguments.train) as split:
        x_train, y_train = split["x_train"], split["y_train"]
    if not arguments.describe and arguments.epochs is None:
        parser.error("give --epochs (or --describe)")
    if arguments.describe:
        forward = forward_flops(make_net_float32())
        description = {
            "forward_flops": forward,
            "batch_size": batch_size,
            "train_images": len(y_train),
            "steps_per_epoch": len(y_train) // batch_size,  # its training loader drops the last partial batch
            "pflop_per_step": TRAINING_PASSES * forward * batch_size / PFLOP,
        }
        print(json.dumps(description))
        return
    with np.load(arguments.test) as dataset:
        x_test, y_test = dataset["x_test"], dataset["y_test"]
    # The split is in class order, and airbench whitens from its first 5,000 images: shuffle once, seeded.
    order = np.random.default_rng(arguments.seed).permutation(len(y_train))
    x_train, y_train = x_train[order], y_train[order]
    with tempfile.TemporaryDirectory(prefix="airbench-") as scratch, on_the_cpu():
        work = Path(scratch)
        cifar_file(work / "train", x_train, y_train)
        cifar_file(work / "test", x_test, y_test)
        cifar_file(work / "cifar10", x_test, y_test)  # train94 opens CifarLoader('cifar10') itself
        os.chdir(work)
        torch.manual_seed(arguments.seed)
        training = loader(work / "train", x_train, train=True, batch_size=batch_size)
        testing = loader(work / "test", x_test, train=False, batch_size=2000)
        started = time.perf_counter()
        net = airbench.train94(training, epochs=arguments.epochs, make_net=make_net_float32, verbose=False)
        training_s = time.perf_counter() - started
        predicting = time.perf_counter()
        accuracy = airbench.evaluate(net, testing, tta_level=airbench94.hyp["net"]["tta_level"])
        predict_s = time.perf_counter() - predicting
    steps = math.ceil(len(training) * arguments.epochs)
    trained_images = steps * batch_size
    forward = forward_flops(net)
    figures = {
        "system": "airbench94 (airbench package)",
        "airbench": version("airbench"),
        "torch": torch.__version__,
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "epochs": arguments.epochs,
        "seed": arguments.seed,
        "train_images": len(y_train),
        "trained_images": trained_images,
        "forward_mflop_per_image": round(forward / 1e6, 3),
        "training_pflop": float(f"{TRAINING_PASSES * forward * trained_images / PFLOP:.4g}"),
        "test_views": 6,  # tta_level 2: the image, its mirror, and both moved a pixel two ways
        "training_s": round(training_s, 1),
        "images_per_s": round(trained_images / training_s),
        "test_accuracy": round(float(accuracy), 4),
        "test_predict_s": round(predict_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if arguments.report:
        arguments.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
