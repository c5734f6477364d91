"""The pure core: the vocabulary every room shares (wire models, configuration,
change feeds, statuses, errors) and the decisions (merging the live set,
choosing targets and instances, ordering, rollout batches, placement, what a
deployment needs). Imports neither ray nor httpx, does no I/O, and imports
nothing of the project outside this package."""
