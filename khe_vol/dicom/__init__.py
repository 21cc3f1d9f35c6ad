"""DICOM in and out: ``khe-vol import`` (scanner export -> imaging_dir) and the SEG / SR export."""
