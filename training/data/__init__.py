"""data: DICOM folders and archives -> cached canonical volumes (through triage.assemble),
labels, patients."""
