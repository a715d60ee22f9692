"""`python -m hadakron` runs the command line, as the `hadakron` script does."""
import sys

from hadakron.cli import main

sys.exit(main())
