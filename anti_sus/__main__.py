"""Allow `python -m anti_sus …`."""
from .cli import main

raise SystemExit(main())
