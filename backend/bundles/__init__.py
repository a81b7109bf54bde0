"""Layer 1: what serving needs to run a model: the catalog of names and weights, bundle files, the onnxruntime predictor. Imports only its own and lower layers (tests/test_layers.py)."""
