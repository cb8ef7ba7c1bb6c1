"""Hyperparameter and scaling search: space sampling (no Ray), the Ray Tune adapter, the driver."""
