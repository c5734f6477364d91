"""What a driver process runs: installing and stopping a coordinator, the
client handle (``Cluster``, ``cluster.aio``), the command line, and the
DB-GPT-compatible ``RayWorkerManager`` with its caller-side router."""
