"""Allow `python -m nomad …`."""
from .cli import main

raise SystemExit(main())
