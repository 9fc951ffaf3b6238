"""The fedge agent: runs beside a scanner, ingests DICOM into a local store, trains locally, sends only deltas."""
