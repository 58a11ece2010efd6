"""``python -m retrysafe``: the same as the ``retrysafe`` command.

See :mod:`retrysafe.cli`.
"""

from .cli import main

raise SystemExit(main())
