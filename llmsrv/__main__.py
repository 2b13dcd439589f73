"""``python -m llmsrv``: the command line (``cli.py``)."""

from .cli import main

raise SystemExit(main())
