from __future__ import annotations

import sys

from benchmarks.telemetry.run import main

sys.exit(main())
