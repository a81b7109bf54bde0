"""Layer 2: mask post-processing: edge snapping, click propagation and their YAML settings. Imports only its own and lower layers (tests/test_layers.py)."""
