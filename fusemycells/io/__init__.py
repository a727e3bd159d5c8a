"""Reading, writing and finding stacks: the reader/writer registry (formats) of the formats TIFF (tiff), OME-Zarr
(omezarr) and SimpleITK's (sitk), what they read into (volume), input folder scanning (scan), GC folder layout
and temporary files (paths)."""
