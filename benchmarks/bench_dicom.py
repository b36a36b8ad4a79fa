"""Reading a DICOM series: SegMoTE's reader against a bare pydicom loop and SimpleITK.

A CT series of ``--slices`` 512 x 512 slices (int16 stored, RescaleIntercept -1024, shuffled
file names) is written once. Then, ``--repeats`` times each, median seconds of:

- ``segmote open``: ``open_image(folder)``: scan headers, sort, check, build the lazy volume;
- ``segmote read``: the same plus decoding every slice (``np.asarray(img.data)``);
- ``bare loop``: ``pydicom.dcmread`` every file, sort by position along the normal, stack
  ``pixel_array * slope + intercept``: what a script without checks does;
- ``SimpleITK``: ``ImageSeriesReader`` (GDCM's sort) + ``GetArrayFromImage``.

Ratios are against the bare loop measured in the same run.

    python benchmarks/bench_dicom.py [--slices 120] [--side 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_loop(folder: Path) -> np.ndarray:
    import pydicom

    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    iop = np.asarray(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                     for d in dss])


def simpleitk(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from segmote_core.io import open_image
    from tests.io.dicom_series import write_series

    rng = np.random.default_rng(0)
    values = rng.integers(-1000, 1500, (args.slices, args.side, args.side)).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        write_series(folder, values, spacing=(1.25, 0.7, 0.7), name="IM")
        runs = {
            "segmote open": lambda: open_image(folder),
            "segmote read": lambda: np.asarray(open_image(folder).data),
            "bare loop": lambda: bare_loop(folder),
        }
        try:
            import SimpleITK  # noqa: F401
            runs["SimpleITK"] = lambda: simpleitk(folder)
        except ImportError:
            pass
        ref = np.asarray(open_image(folder).data)
        assert np.array_equal(ref, values), "the reader changed the values"
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["bare loop"])
    print(f"{args.slices} slices of {args.side}x{args.side}, median of {args.repeats}:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:13s} {med:7.3f} s   {med / base:5.2f}x bare loop   "
              f"{args.slices / med:7.1f} slices/s")


if __name__ == "__main__":
    main()
