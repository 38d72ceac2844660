"""assemble: read headers, pick the axial head-CT series, build the canonical volume from its geometry."""
