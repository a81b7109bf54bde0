"""Layer 1: whole-slide images: slides, annotations, patch extraction. Imports only its own and lower layers (tests/test_layers.py)."""
