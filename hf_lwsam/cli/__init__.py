"""Command-line entry points of hf_lwsam (`hf-lwsam-train`)."""
