"""Data: readers (MSD, folder pairs, single files, DICOM), splits, preprocessing, caching."""
