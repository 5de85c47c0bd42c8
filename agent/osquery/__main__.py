"""``python -m agent.osquery --socket S --timeout T --interval I``: the extension, no CLI."""

from __future__ import annotations

import sys

from agent.osquery.server import run_extension

sys.exit(run_extension(sys.argv[1:]))
