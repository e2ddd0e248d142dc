"""What the demo agents share: reading the envelope, writing the output."""

import json
import os


def envelope():
    with open(os.environ["ORCHESTRATOR_ENVELOPE"], encoding="utf-8") as f:
        return json.load(f)


def finish(**output):
    with open(os.environ["ORCHESTRATOR_OUTPUT"], "w", encoding="utf-8") as f:
        json.dump(output, f)
