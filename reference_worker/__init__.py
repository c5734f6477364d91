"""The reference worker: a simulated DB-GPT worker manager with fault knobs,
for the quick start, the examples, the tests and the benchmarks. Not part of
the control plane (``coordinator``, ``actors``): nothing there imports it.

Run one with ``python -m reference_worker --controller URL --model NAME@TYPE``.
"""

from reference_worker.engine import EngineSettings
from reference_worker.host import ReferenceWorkerHost
from reference_worker.sim import Faults, SimModel, WorkerSettings
from reference_worker.worker import ReferenceWorker

__all__ = ["EngineSettings", "Faults", "ReferenceWorker", "ReferenceWorkerHost", "SimModel", "WorkerSettings"]
