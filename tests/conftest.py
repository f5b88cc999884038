import sys
from pathlib import Path

# the tests folder is importable as a package-less module path, so spawned DDP workers can unpickle helpers
sys.path.insert(0, str(Path(__file__).parent))
