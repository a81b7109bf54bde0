"""Layer 6: `histosam bench`: speed and memory measurements (torch ones too). Imports only its own and lower layers (tests/test_layers.py)."""


def progress(bench: str, text: str) -> None:
    """A progress line on stderr (stdout holds the results): benches run for tens of seconds."""
    import sys

    print(f"histosam bench {bench}: {text}", file=sys.stderr, flush=True)
