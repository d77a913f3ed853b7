"""``python -m dicomagent``: the same as the ``dicomagent`` console script."""

from dicomagent.cli import main

raise SystemExit(main())
