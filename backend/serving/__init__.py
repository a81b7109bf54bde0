"""Layer 3: the gRPC server, sessions, wire format, image sources, model store, and the Python client. Imports only its own and lower layers (tests/test_layers.py)."""
