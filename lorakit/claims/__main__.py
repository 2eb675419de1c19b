"""`python -m lorakit.claims ...` (see `lorakit.claims.command`)."""
import sys

from .command import main

sys.exit(main())
