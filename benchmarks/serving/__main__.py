"""``python -m benchmarks.serving``: the serving benchmark (:mod:`benchmarks.serving.run`)."""

import sys

from benchmarks.serving.run import main

sys.exit(main())
