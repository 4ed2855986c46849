"""The RunPod Hub's publishing guide asks for a handler.py. The worker is the `handler` package,
which the image starts as `python -m handler`; run from anywhere, this file starts the same
worker (with the same flags)."""

import os
import runpy
import sys

here = os.path.dirname(os.path.abspath(__file__))
# This file's own folder first on the path would make `import handler` import this file.
sys.path[:] = [path for path in sys.path if os.path.abspath(path or ".") != here]
sys.path.insert(0, os.path.dirname(here))
runpy.run_module("handler", run_name="__main__", alter_sys=True)
