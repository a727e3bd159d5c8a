"""The napari plugin: fuse a 3D image layer with the package's pipeline (``pip install "fusemycells[napari]"``).

:mod:`fusemycells.napari.fusion` holds the work (no Qt: validation of the layer, the fusion with progress and
cancel, the layers to add); :mod:`fusemycells.napari.widget` the dock widget that runs it in a worker thread;
:mod:`fusemycells.napari.reader` opens the stacks of every format the command line reads (TIFF, SimpleITK
formats, OME-Zarr) with their spacing as the layer's scale.
``napari.yaml`` (npe2) declares them; pyproject.toml's ``napari.manifest`` entry point points napari to it.
"""
