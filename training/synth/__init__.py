"""synth: synthetic head-CT studies written as DICOM, the ground truth the tests and experiments use."""
