"""Files on disk: atomic writes of every output, and the runs/latest pointer."""
