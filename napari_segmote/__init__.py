"""napari plugin of SegMoTE: interactive annotation of 2D images and volumes (npe2).

The contributions are declared in ``napari.yaml`` (the repository's top-level manifest); the
modules load lazily when napari calls them, so importing this package costs next to nothing: it
only installs :class:`_IsolatedTritonLoader` (see docs/napari.md, "Triton and Mesa's LLVM").
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from typing import Any

__all__: list[str] = []

log = logging.getLogger(__name__)

_TRITON_EXTENSION = "triton._C.libtriton"


def _llvm_already_mapped() -> list[str]:
    """Paths of shared LLVM libraries already in this process (Mesa's GL drivers bring one)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return sorted({line.split()[-1] for line in maps if "/libLLVM" in line})
    except OSError:
        return []


class _IsolatedTritonLoader(importlib.abc.MetaPathFinder):
    """Loads triton's compiler library with ``RTLD_DEEPBIND`` when a libLLVM is already mapped.

    ``libtriton.so`` links its own LLVM statically but exports the LLVM symbols; Mesa's OpenGL
    drivers (llvmpipe, radeonsi) put the system ``libLLVM-NN.so`` in the global symbol scope
    when napari creates its GL context. Loaded normally after that, libtriton's static
    constructors bind to the other LLVM's objects (different version, different layout) and
    crash the process. ``RTLD_DEEPBIND`` makes libtriton resolve its own symbols first, so
    triton keeps working in the viewer process. Torch imports triton from ``torch._dynamo``,
    which torchvision (hence ``segment_anything``) imports: every widget needs this.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == _TRITON_EXTENSION and path:
            _preload_deepbind(list(path))
        return None                       # the regular finders import the module as usual


def _preload_deepbind(package_dirs: list[str]) -> None:
    libs = _llvm_already_mapped()
    if not libs:
        return                            # nothing to clash with: plain import
    import ctypes

    for folder in package_dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = os.path.join(folder, "libtriton" + suffix)
            if os.path.isfile(candidate):
                # The import that follows dlopens the same file and gets this handle back,
                # with the relocations made here.
                ctypes.CDLL(candidate, mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
                log.info("loaded %s with RTLD_DEEPBIND (already mapped: %s)", candidate,
                         ", ".join(libs))
                return


def _install() -> None:
    if not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND"):
        return                            # the clash needs ELF symbol interposition
    if _TRITON_EXTENSION in sys.modules:
        return                            # loaded before any GL context: nothing to do
    if not any(isinstance(f, _IsolatedTritonLoader) for f in sys.meta_path):
        sys.meta_path.insert(0, _IsolatedTritonLoader())


_install()
