#!/usr/bin/env python
"""embedfleet's command line (``cli.app``): ``python launch.py --help``."""

from cli.app import main

if __name__ == "__main__":
    main()
