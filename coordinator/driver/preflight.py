"""One quick question to the Ray cluster before ``ray.init()``: does its GCS
answer this machine, and does it take our credentials?

Without it, a token mismatch (the head started with ``RAY_AUTH_MODE=token``,
this shell without it, or with another token) costs twenty seconds of
retries and a warning a second from Ray's C++ client, then a bare
``ConnectionError``. Asked directly, the GCS says ``UNAUTHENTICATED`` in
milliseconds, and the command line can say what to set.

:func:`advice` is the decision (what to tell the user, given the answer);
:func:`check` asks the question.
"""

from __future__ import annotations

import os

#: Seconds the GCS has to answer the question.
DEADLINE = 3.0


def advice(code: str, address: str, local_mode: str) -> str | None:
    """What to tell the user when the GCS at ``address`` answered a
    ``GetClusterId`` with gRPC status ``code`` (its name: ``OK``,
    ``UNAUTHENTICATED``, ``UNAVAILABLE``, …) while this process runs with
    ``RAY_AUTH_MODE=local_mode``. None: go on and let ``ray.init`` connect."""
    if code == "UNAUTHENTICATED":
        if local_mode != "token":
            return (f"the Ray cluster at {address} wants a token (its head runs with RAY_AUTH_MODE=token) and "
                    f"this shell has RAY_AUTH_MODE={local_mode or 'unset'}: set RAY_AUTH_MODE=token, with the "
                    f"head's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        return (f"the Ray cluster at {address} refuses this shell's token: use the head's token (copy its "
                f"~/.ray/auth_token here, or set RAY_AUTH_TOKEN to it)")
    if code == "UNAVAILABLE":  # a slow answer (DEADLINE_EXCEEDED) may still be a cluster: ray.init decides
        return (f"no Ray cluster answers at {address}: start one with 'ray start --head', or give its address "
                f"with --address (or RAY_ADDRESS)")
    return None


def check(address: str | None) -> str | None:
    """Ask the GCS of the cluster ``ray.init(address)`` would join; what to
    tell the user when it cannot work (None: it should, or we could not tell)."""
    try:
        import grpc
        from ray._private.gcs_utils import create_gcs_channel
        from ray._private.services import canonicalize_bootstrap_address
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        gcs = canonicalize_bootstrap_address(address or "auto")
    except ConnectionError:  # "auto", and no cluster on this machine
        return ("no Ray cluster is running on this machine: start one with 'ray start --head' (with the same "
                "RAY_AUTH_MODE as this shell), or give its address with --address (or RAY_ADDRESS)")
    except Exception:  # Ray's internals moved: ray.init says it its own way
        return None
    if gcs is None:
        return None
    try:
        channel = create_gcs_channel(gcs)
    except Exception as exc:  # e.g. token mode with no token to send, or TLS files that do not load
        return _unusable(exc)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=DEADLINE)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
    except Exception as exc:  # raised by Ray's client interceptors before anything is sent
        return _unusable(exc)
    finally:
        channel.close()
    shown = gcs if address in (None, "auto") else address  # the address the user gave, when they gave one
    return advice(code, shown, os.environ.get("RAY_AUTH_MODE", ""))


def _unusable(exc: Exception) -> str | None:
    """What to say when the question could not even be asked: a token mode
    with no token is worth a line; anything else, ``ray.init`` says its way."""
    if type(exc).__name__ == "AuthenticationError":
        return ("RAY_AUTH_MODE=token is set but this shell has no token: put the head's token in "
                "~/.ray/auth_token or RAY_AUTH_TOKEN")
    return None
