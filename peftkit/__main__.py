"""``python -m peftkit``: the same commands as the ``peftkit`` console script."""

from __future__ import annotations

from peftkit.cli import main

raise SystemExit(main())
