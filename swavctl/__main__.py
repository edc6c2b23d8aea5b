"""``python -m swavctl``."""

from swavctl.cli.app import main

main()
