"""Allow `python -m gallery_bridge …`."""
from .cli import main

raise SystemExit(main())
