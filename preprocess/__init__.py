"""DICOM series -> HU -> windows -> 2.5D images; labels; the offline convert job; synthetic data."""
