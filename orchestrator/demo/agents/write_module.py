"""Demo agent: add a module with one text function to the textkit package."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import envelope, finish

BODIES = {
    "slugify": '''import re


def slugify(text: str) -> str:
    """Lower-case *text* and join its words with hyphens."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))
''',
    "word_count": '''def word_count(text: str) -> int:
    """How many whitespace-separated words *text* has."""
    return len(text.split())
''',
}

inputs = envelope()["inputs"]
module, function = inputs["module"], inputs["function"]
path = os.path.join("textkit", f"{module}.py")
with open(path, "w", encoding="utf-8") as f:
    f.write(BODIES[function])
print(f"wrote {path}")
finish(files=[path], function=f"textkit.{module}.{function}")
