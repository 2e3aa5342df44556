"""``python -m hashmesh.cli`` is ``hashctl``."""

from hashmesh.cli.app import main

main()
