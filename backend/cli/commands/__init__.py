"""CLI subcommands, one module each (see histosam.backend.cli)."""
