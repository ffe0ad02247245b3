"""Training xMGIE models: MGIE's objective, paired data and a synthetic dataset with exact targets."""
