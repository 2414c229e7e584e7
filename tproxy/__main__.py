"""``python -m tproxy`` is the ``tproxy`` command."""

from .cli import main

raise SystemExit(main())
