"""One module per command (or command group); ``swavctl.cli`` registers them."""
