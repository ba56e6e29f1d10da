"""The shared tier: replicas share their ``exact`` and ``prefix`` entries through Redis (docs/shared.md).

:mod:`.settings` checks the URL and ``shared_store_kwargs`` (torch- and redis-free, for the config),
:mod:`.codec` frames an entry as signed safetensors bytes, :mod:`.client` talks to Redis (one bounded pipelined
read per lookup, a background writer bounded in entries and bytes, the breaker, the counters), :mod:`.tier` names
keys, checks values and fills a bank.
The tier is imported by the controller only when ``shared_store`` is set.
"""
