"""Plain prompt-free PPT (no text) on the plugin's dermoscopy sample, outside the GUI.

    python scripts/dermoscopy_sample_check.py [CHECKPOINT ...]   (default: the bundled demo)

The sample of ``tests/napari/test_demo.py`` (seed 0, 192 px; it asks auto Dice >= 0.80 and box
Dice >= 0.85) and three variants of it (other seeds and sizes), each segmented by
``predict(auto=True)`` and by the lesion's bounding box. A quick check of a trained model's plain
PPT path before the slower evaluations (docs/demo_model.md).
"""

from __future__ import annotations

import argparse

import torch

from segmote_core.build import demo_model_path, load_segmote
from segmote_core.geometry import mask_to_box
from segmote_core.predictor import SegMoTEPredictor
from segmote_core.sample_images import make_dermoscopy_phantom
from training.losses import dice_score as dice

#: (seed, size): the plugin's sample first
SAMPLES = ((0, 192), (1, 192), (2, 256), (3, 160))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    for path in args.checkpoints or [str(demo_model_path())]:
        predictor = SegMoTEPredictor(load_segmote(path))
        auto, box = [], []
        for seed, size in SAMPLES:
            image, lesion = make_dermoscopy_phantom(size=size, seed=seed)
            predictor.set_image(image, modality="DERM")
            auto.append(dice(predictor.predict(auto=True).masks[0], lesion))
            box.append(dice(predictor.predict(box=mask_to_box(lesion)).masks[0], lesion))
        print(f"{path}\n  auto (PPT, no text): " + " ".join(f"{d:.3f}" for d in auto)
              + "\n  box:                 " + " ".join(f"{d:.3f}" for d in box)
              + f"\n  the plugin's sample (seed 0, 192 px): auto {auto[0]:.3f}, box {box[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
