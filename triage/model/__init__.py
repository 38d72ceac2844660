"""model: the Glow flows, the scorer, model sets (registry, calibration) and what scoring returns."""
