"""Paper claims held to our data: `python -m lorakit.claims` (or `lorakit claims`) writes docs/claims.md.

`registry.CLAIMS` lists the claims; `stats` holds the intervals and the verdict rule; `experiments` and `external`
produce the measurements; `table` renders the page; `command` is the command line.
"""
from .records import Assessment, Claim, Context, Measurement, assess, load_measurement, save_measurement
from .stats import RULE, Condition, Interval, Verdict, paired_bootstrap, replicate_interval, verdict

__all__ = ["Assessment", "Claim", "Condition", "Context", "Interval", "Measurement", "RULE", "Verdict", "assess",
           "load_measurement", "paired_bootstrap", "replicate_interval", "save_measurement", "verdict"]
