"""Reading, writing and finding stacks: TIFF (tiff), OME-Zarr (omezarr), GC folder layout (paths)."""
