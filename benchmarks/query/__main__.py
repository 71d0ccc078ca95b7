from __future__ import annotations

import sys

from benchmarks.query.run import main

sys.exit(main())
