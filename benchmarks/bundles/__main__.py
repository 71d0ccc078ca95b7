from __future__ import annotations

import sys

from benchmarks.bundles.run import main

sys.exit(main())
