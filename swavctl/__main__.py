"""``python -m swavctl``."""

from swavctl.cli import main

main()
