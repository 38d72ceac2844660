"""report: what goes back to the hospital: the DICOM SR, the HL7 ORU^R01 and the routing rules."""
