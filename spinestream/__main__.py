"""``python -m spinestream <verb> ...``: the console script, where the ``spinestream`` executable is not on PATH
(a notebook kernel whose environment's bin/ is not on PATH)."""
import sys

from spinestream.cli import main

sys.exit(main())
