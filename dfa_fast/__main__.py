"""`python -m dfa_fast ...` is the `dfa-fast` command (the deepspeed launcher uses this form)."""
import sys

from dfa_fast.cli import main

sys.exit(main())
