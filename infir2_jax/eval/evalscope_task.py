"""Runs one evalscope task from a JSON spec: `python evalscope_task.py SPEC.json`.

Imports only evalscope and the standard library, so it runs in whichever environment has
evalscope (`eval.evalscope_python`; evalscope pins its own versions of huggingface_hub,
datasets, pandas). The spec holds TaskConfig's fields, plus `offline` (default true: no hub
access, for local datasets).
"""

from __future__ import annotations

import json
import os
import sys

# Python puts this script's directory first on sys.path; its sibling modules (datasets.py,
# ...) would shadow the libraries evalscope imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.pop("offline", True):  # local data only: never reach for a hub
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(name, "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    try:
        from evalscope import TaskConfig, run_task
    except ImportError as e:
        print(
            f"error: evalscope is not installed for {sys.executable} ({e}); "
            "pip install -r requirements-eval.txt, or set eval.evalscope_python",
            file=sys.stderr,
        )
        return 2
    for args in spec.get("dataset_args", {}).values():
        if isinstance(args.get("primary_metric"), dict):
            from evalscope.api.metric.semantics import MetricSelector

            args["primary_metric"] = MetricSelector(**args["primary_metric"])
    run_task(TaskConfig(**spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
