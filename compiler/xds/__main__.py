"""`python -m compiler.xds [flags]` runs `meshc serve`."""

import sys

from compiler.xds.cli import main

sys.exit(main())
