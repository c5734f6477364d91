"""A driver for `ray job submit`: restart a model, one instance at a time, on a
coordinator that is already running on the cluster.

    coordinator start --config examples/coordinator.yaml        # once, on the head
    ray job submit --working-dir . -- python examples/job_submit.py --model chatgpt-test

Inside a job, ray.init() joins the job's cluster. Exits 1 if any instance failed.
"""

from __future__ import annotations

import argparse
import sys

import ray

import coordinator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--worker-type", default="llm")
    parser.add_argument("--name", default="dbgpt-coordinator")
    parser.add_argument("--namespace", default="dbgpt")
    parser.add_argument("--max-unavailable", type=int, default=1)
    args = parser.parse_args()
    ray.init(namespace=args.namespace)
    cluster = coordinator.attach(args.name, namespace=args.namespace)
    live = cluster.instances(args.model, args.worker_type, healthy_only=False)
    print(f"{args.model}@{args.worker_type}: {len(live)} instances")
    result = cluster.apply(args.model, "restart", worker_type=args.worker_type,
                           max_unavailable=args.max_unavailable)
    for out in result.outputs:
        print(f"{out.host}:{out.port} {'ok' if out.success else 'FAILED'}: {out.message}")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
