"""Start egress-agent's command line from the packaged library directory.

Run by /opt/egress-agent/libexec/python (isolated, without site-packages), so sys.path holds only
the standard library: the pinned libraries beside this file's parent come first, and nothing the
distribution installed can shadow them. argv[0] is set so that usage messages name the command.
"""

import os
import sys

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
sys.path.insert(0, LIBRARY)
sys.argv[0] = "egress-agent"

from agent.cli import main  # noqa: E402  (the path is set just above)

sys.exit(main())
