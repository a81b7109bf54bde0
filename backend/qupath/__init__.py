"""Layer 3: QuPath: project sync and script install. Imports only its own and lower layers (tests/test_layers.py)."""
