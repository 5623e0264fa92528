"""`python -m imgclf.cli ...`: the command line without the installed `imgclf` script."""

from imgclf.cli.app import script

script()
