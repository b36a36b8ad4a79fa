"""Medical image I/O: readers, label writers, the cohort zarr format (docs/formats.md) and ingest.

```python
from segmote_core.io import open_image, write_labels, create_cohort, write_case, open_cohort
```
"""

from __future__ import annotations

from .cohort import (COHORT_KIND, Case, Cohort, CohortError, CohortNotFoundError, create_cohort,
                     open_cohort, slice_chunks, valid_case_id, write_case)
from .image import (ImageReadError, ImageTypeError, MedicalImage, nifti_to_zyx_affine,
                    spacing_affine, zyx_to_nifti_affine)
from .readers import IMAGE_SUFFIXES, guess_modality, open_image
from .writers import LABEL_SUFFIXES, write_labels

__all__ = [
    "COHORT_KIND", "Case", "Cohort", "CohortError", "CohortNotFoundError", "slice_chunks", "IMAGE_SUFFIXES", "ImageReadError", "ImageTypeError",
    "LABEL_SUFFIXES", "MedicalImage", "create_cohort", "guess_modality", "nifti_to_zyx_affine",
    "open_cohort", "open_image", "spacing_affine", "valid_case_id", "write_case", "write_labels",
    "zyx_to_nifti_affine",
]
