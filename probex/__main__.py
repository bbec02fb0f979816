"""`python -m probex …` — see probex/cli.py."""
import sys

from probex.cli import main

sys.exit(main())
