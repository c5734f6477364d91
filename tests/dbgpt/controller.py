"""DB-GPT 0.8.2's own model controller, served by DB-GPT's code: run with the
DB-GPT virtual environment's Python (``python controller.py PORT``).

``dbgpt start controller`` needs packages that are not on the package index; the
controller itself is DB-GPT's router over its ``EmbeddedModelRegistry``, which is
all this script builds before handing the app to uvicorn."""

import sys

import uvicorn
from fastapi import FastAPI

from dbgpt.model.cluster.controller.controller import initialize_controller
from dbgpt.model.cluster.registry import EmbeddedModelRegistry


def main() -> None:
    port = int(sys.argv[1])
    app = FastAPI()
    initialize_controller(app=app, registry=EmbeddedModelRegistry())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
