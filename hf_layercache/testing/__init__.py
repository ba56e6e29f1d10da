"""Conformance suites that third-party backends, policies and strategies can run on themselves.

``hf_layercache.testing.backends`` checks a backend class, ``hf_layercache.testing.policies`` a policy class and
``hf_layercache.testing.strategies`` a registered strategy (by name, on tiny models); the project's own tests run
them over every registered name.
"""
