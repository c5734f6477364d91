"""Plumbing shared by the actors and the coordinator: metrics, the HTTP
transport's settings and error mapping, process facts. Imports only the core."""
