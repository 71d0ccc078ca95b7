from __future__ import annotations

import sys

from benchmarks.rollout.run import main

sys.exit(main())
