"""Demo agent: write a test for a textkit function and run it.

``inputs.cases`` lists ``[argument, expected]`` pairs. The function may come from the base
commit or from an upstream task's result (``depends_on``): the worktree starts from it.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import envelope, finish

inputs = envelope()["inputs"]
module, function = inputs["module"], inputs["function"]
cases = "".join(f"    assert {function}({arg!r}) == {want!r}\n" for arg, want in inputs["cases"])
os.makedirs("tests", exist_ok=True)
path = os.path.join("tests", f"test_{module}.py")
with open(path, "w", encoding="utf-8") as f:
    f.write(
        f"from textkit.{module} import {function}\n\n\n"
        f"def test_{function}():\n{cases}\n\n"
        f"if __name__ == '__main__':\n"
        f"    test_{function}()\n"
        f"    print('ok')\n"
    )
check = subprocess.run(
    [sys.executable, path], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."}
)
print(check.stdout, end="")
print(check.stderr, end="", file=sys.stderr)
if check.returncode != 0:
    sys.exit(f"the new test fails: {check.stderr.strip().splitlines()[-1:]}")
finish(files=[path], passed=True)
