"""Optional integrations with other libraries, imported lazily by the core and the methods."""

from __future__ import annotations

__all__: list[str] = []
