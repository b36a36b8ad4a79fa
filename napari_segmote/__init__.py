"""napari plugin of SegMoTE: interactive annotation of 2D images and volumes (npe2).

The contributions are declared in ``napari.yaml`` (the repository's top-level manifest); the
modules load lazily when napari calls them, so importing this package costs nothing.
"""

from __future__ import annotations

__all__: list[str] = []
