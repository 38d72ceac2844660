"""receive: the DICOM SCP (pynetdicom) that PACS forwards studies to; instances are durable before success."""
