"""evaluate: ROC/AUC with confidence intervals, histograms, montages and report.json from scores."""
