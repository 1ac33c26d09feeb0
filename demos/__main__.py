"""`python -m demos COMMAND ...` (the same as `python sampler.py COMMAND ...`): see demos/cli.py."""
import sys

from demos.cli import main

sys.exit(main())
