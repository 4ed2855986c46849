"""Time PNG encoding on 1024x1024 photographs and print JSON: Pillow at each zlib level, and
the worker's own writer (handler.outputs.encode_png: Up filter, level 1, parallel deflate).

    python scripts/measure_png.py PHOTO.png [PHOTO.png ...]

Each photo is resized to 1024x1024 (bicubic), like an SDXL output; a 1024x1024 random-noise
image (what the benchmark's random-weight models draw) is measured too. The figures in README's
"Encoding" section come from this script (photos: scikit-image's astronaut, coffee and chelsea).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(image: Image.Image, level: int | None, repeats: int = 5) -> tuple[float, int]:
    """Best-of-`repeats` seconds and the size in bytes at one Pillow compress level (None: the
    worker's own writer)."""
    from handler.outputs import encode_png

    best, size = float("inf"), 0
    for _ in range(repeats):
        buffer = io.BytesIO()
        started = time.perf_counter()
        if level is None:
            buffer.write(encode_png(image))
        else:
            image.save(buffer, format="PNG", compress_level=level)
        best = min(best, time.perf_counter() - started)
        size = buffer.tell()
    return best, size


def main() -> None:
    photos = [
        Image.open(p).convert("RGB").resize((1024, 1024), Image.BICUBIC) for p in sys.argv[1:]
    ]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), np.uint8))
    rows = []
    for level in [*range(10), None]:
        seconds, sizes = zip(*(measure(photo, level) for photo in photos), strict=True)
        noise_s, noise_size = measure(noise, level, repeats=3)
        rows.append(
            {
                "encoder": "pillow" if level is not None else "worker (Up filter, parallel)",
                "compress_level": level if level is not None else 1,
                "mean_ms": round(1000 * sum(seconds) / len(seconds), 1),
                "mean_kib": round(sum(sizes) / len(sizes) / 1024),
                "noise_ms": round(1000 * noise_s, 1),
                "noise_kib": round(noise_size / 1024),
            }
        )
    print(
        json.dumps(
            {
                "photos": [Path(p).name for p in sys.argv[1:]],
                "size": "1024x1024",
                "pillow": Image.__version__,
                "cpu_cores": os.cpu_count(),
                "results": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
