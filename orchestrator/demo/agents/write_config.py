"""Demo agent: write settings.toml with tomli-w, installed into this task's own venv."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tomli_w
from _common import envelope, finish

settings = envelope()["inputs"]["settings"]
with open("settings.toml", "wb") as f:
    tomli_w.dump({"tool": {"textkit": settings}}, f)
print("wrote settings.toml with tomli-w from", os.environ["VIRTUAL_ENV"])
finish(files=["settings.toml"], venv=os.environ["VIRTUAL_ENV"])
