"""Test-session set-up shared by tests/ and the nbval notebook runs: run folders go to a temporary place."""

import os
import tempfile

os.environ["ADVKIT_RUNS_BASE"] = tempfile.mkdtemp(prefix="advkit-test-runs-")
