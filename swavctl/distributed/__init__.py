"""Running on several processes and devices."""
