"""Layer 0: errors, atomic writes, the settings loader, geometry, transforms, the predictor protocol: what every layer may use. Imports only its own and lower layers (tests/test_layers.py)."""
