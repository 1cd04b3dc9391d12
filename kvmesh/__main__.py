"""`python -m kvmesh` is the `kvmesh` command."""

import sys

from kvmesh.tools.cli.main import main

sys.exit(main())
