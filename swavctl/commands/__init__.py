"""One module per command (or command group); ``swavctl.cli.app`` registers them."""
