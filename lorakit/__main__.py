"""`python -m lorakit ...` (also `torchrun -m lorakit train ...`)."""
import sys

from .cli import main

sys.exit(main())
