"""The coordinator itself, as it runs inside its Ray actor: the RPC face
(``actor``) holding the service, which holds its rooms — the fleet's view,
operations, the deployment keeper — and supervises its loops; ``ray_links`` is
the one place that calls ``.remote()`` on watchers, proxies and registries."""
