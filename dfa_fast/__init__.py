"""dfa-fast: fast and faithful DisEnt, LfF and Vanilla training for debiased image classification."""
__version__ = "0.1.0"
