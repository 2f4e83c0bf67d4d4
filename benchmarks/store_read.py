"""Reading a SampleStore as training arrays: the read-only loader the cloud side uses (common/dataset.py) vs the
device's own reader (SampleStore.load_arrays, the peer), on the same store, with the same arrays out.

The loader is what the server's eval set, the cloud's pretraining data and ``fedge evaluate`` read a store with;
it opens SQLite read-only and decodes each row once. Usage:

    .venv/bin/python benchmarks/store_read.py [--samples 2000] [--repeats 5]

Last line: ``loader_vs_store_speed=… samples=… loader_s=… store_s=…`` (store seconds / loader seconds, best of
``--repeats`` interleaved runs; above 1 means the loader is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

from fedge.common.dataset import load_data
from fedge.common.synthetic import make_av_dataset
from fedge.edge.store import SampleStore


def make_store(root: Path, n: int) -> None:
    """``n`` labelled samples of the synthetic task, two in three with both modalities, as an ingest writes them."""
    d = make_av_dataset(n, seed=0, image_noise=0.1)
    rows = []
    for i in range(n):
        bgr = (d["image"][i].transpose(1, 2, 0)[:, :, ::-1] * 255).round().astype(np.uint8)
        big = cv2.resize(bgr, (96, 96), interpolation=cv2.INTER_LINEAR)  # keyframes are stored larger
        jpeg = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        rows.append({"image_jpeg": jpeg if i % 3 != 2 else None, "audio": d["audio"][i] if i % 3 != 1 else None,
                     "label": int(d["label"][i])})
    with SampleStore(root) as st:
        for s in range(0, n, 500):
            st.put_many(rows[s:s + 500])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="samples in the store")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed reads of each reader")
    args = parse_quick(ap, samples=100, repeats=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        make_store(root, args.samples)
        times: dict[str, list[float]] = {"loader": [], "store": []}
        out: dict[str, dict[str, np.ndarray]] = {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out["loader"] = load_data(root, image_size=32, n_mels=40, frames=32, num_classes=10)
            times["loader"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with SampleStore(root) as st:
                out["store"] = st.load_arrays(image_size=32, n_mels=40, frames=32)
            times["store"].append(time.perf_counter() - t0)
        for k in out["store"]:
            if not np.array_equal(out["loader"][k], out["store"][k]):
                raise SystemExit(f"the readers disagree on {k!r}")
    best = {k: min(v) for k, v in times.items()}
    print(f"{args.samples} samples, best of {args.repeats}: loader {best['loader']:.3f} s, "
          f"SampleStore.load_arrays {best['store']:.3f} s; identical arrays")
    print(f"loader_vs_store_speed={best['store'] / best['loader']:.2f} samples={args.samples} "
          f"loader_s={best['loader']:.3f} store_s={best['store']:.3f}")


if __name__ == "__main__":
    main()
