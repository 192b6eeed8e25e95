"""Site data: the federation format, DICOM reading, preprocessing, the uint8 cache and splits."""
