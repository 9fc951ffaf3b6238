"""DICOM ingest: decode scanner images into a de-identified local dataset store; quarantine what cannot be read."""
