from __future__ import annotations

import sys

from benchmarks.nudge.run import main

sys.exit(main())
