"""Which inference batch sizes give an image the same output bytes wherever it sits in the batch.

Usage: [ONEDNN_MAX_CPU_ISA=AVX2] python -m bench.batch_positions [--sizes 1 4 6 8 12 16 24 48] [--images 48]

oneDNN picks kernels by instruction set and shape, and a kernel may treat the rows of a batch
unevenly (a tail after full blocks). For each size and both nets (fresh weights), every image
is predicted alone (padded to the size, so at position 0) and inside the batches of the whole
set, and the bytes compared. Run it once as it is and once under the AVX2 cap (the kernels of a
CPU without AVX-512, and of portable mode) to see the sizes safe on both.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.predict import cpu_line
from tasks.lib.cli import filter_native_stderr


def main() -> None:
    """Print, per net and batch size, how many images came out with other bytes in a batch than alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 6, 8, 12, 16, 24, 48])
    parser.add_argument("--images", type=int, default=48)
    arguments = parser.parse_args()
    filter_native_stderr()
    import os

    from tasks.lib.model import build_model, predict_in_batches

    print(f"{cpu_line()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")
    images = np.random.default_rng(0).integers(0, 256, (arguments.images, 32, 32, 3), dtype=np.uint8)
    for name, options in (("tutorial_cnn", {}), ("speed_cnn", {"widths": (32, 128, 128)})):
        model = build_model(name, (32, 32, 3), 10, **options)
        for size in arguments.sizes:
            together = predict_in_batches(model, images, batch_size=size)
            alone = np.concatenate([predict_in_batches(model, image[None], batch_size=size) for image in images])
            differing = int((together != alone).any(axis=1).sum())
            print(f"{name} batch {size}: {differing} of {len(images)} images differ", flush=True)


if __name__ == "__main__":
    main()
