"""labelcat: a batch pipeline that labels a shop's product photos.

Stages live in their own modules (ingest, decode, dedupe, junk, infer,
output) and ``run`` wires them together; ``cli`` is the command line.
"""

__version__ = "0.1.0"
