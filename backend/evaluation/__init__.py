"""Layer 3: the simulated user and its numbers: clicker, metrics, the evaluation loop, baselines, report, data splits. Imports only its own and lower layers (tests/test_layers.py)."""
