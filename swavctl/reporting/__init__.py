"""What a run reports as it goes: the progress display, TensorBoard events, provenance."""
