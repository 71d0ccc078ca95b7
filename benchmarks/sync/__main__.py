from __future__ import annotations

import sys

from benchmarks.sync.run import main

sys.exit(main())
