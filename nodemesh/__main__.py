"""`python -m nodemesh ...`: how the lab starts its processes (same as the `nodemesh` script)."""

from nodemesh.cli import main

main()
