"""DICOM in and out: a site's scanner export into the imaging folder (``khe-vol import``), and the
final masks and measurements back as DICOM SEG and SR (``khe-vol dicom-export``).

* ``series.py``: the image series of a folder (headers), slice order, and the geometry
  problems that make a volume wrong (mixed series, missing slices, varying spacing, tilt);
* ``select.py``: the documented rule that says which series of a study is the T2
  (config ``dicom_series_rule``);
* ``visits.py``: which participant and session a study is (visits table or month window);
* ``importer.py``: conversion with dcm2niix, checked against the DICOM, de-identified
  NIfTI and sidecar, the UID map and the import report outside the imaging folder;
* ``export.py``: the DICOM SEG of a final mask and the TID 1500 SR of its measurements.
"""
