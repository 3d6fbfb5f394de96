"""The runtime tests share helpers (rl_runs.py) and test plug-ins that live in this folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
